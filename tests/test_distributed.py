"""Data parallelism through the engine (DDP over gloo on the CPU, set up as torchrun sets it up):
two ranks with half the rows each compute the same gradient as one process with all of them,
scaled by tokens, and stay identical after optimizer steps (AdamW, and Muon: every rank
orthogonalises the same all-reduced gradient)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tinygpt.config import ModelConfig
from tinygpt.model import GPT
from tinygpt.device import setup_device
from tinygpt.train.engine import prepare
from tinygpt.train.stage import FunctionStage, TrainOptions

ROWS, VOCAB = 8, 97


def _data():
    torch.manual_seed(0)
    data = torch.randint(0, VOCAB, (ROWS, 17))
    data[1, 9:] = -100          # uneven token counts per rank: the division must be by the global count
    data[6, 3:] = -100
    return data


def _model():
    torch.manual_seed(1)
    model = GPT(ModelConfig.from_name("nano", vocab_size=VOCAB))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def _step(m, b):
    x, y = b
    loss = torch.nn.functional.cross_entropy(m(x).flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
    return loss, (y != -100).sum(), {}


def _engine(rank, world, out, optimizer="adamw"):
    data = _data()
    per = ROWS // world

    def batches(i):
        rows = data[rank * per:(rank + 1) * per]
        return rows[:, :-1].clamp(min=0), rows[:, 1:]
    stage = FunctionStage(_model(), _step, batches, TrainOptions(out=str(out), steps=3, dtype="float32", quiet=True,
                                                                 lr=1e-2, device="cpu", optimizer=optimizer),
                          log=lambda *a: None)
    eng = prepare(stage)       # rank and world from the environment, as under torchrun
    assert (eng.rank, eng.world) == (rank, world)
    return eng


def _worker(rank, world, tmp, optimizer):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    # the group through a file (no TCP port to race for); setup_device then finds it initialised
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(tmp, "store"), world), rank=rank,
                            world_size=world)
    device, r, w = setup_device("cpu")
    assert (device.type, r, w) == ("cpu", rank, world) and dist.is_initialized()
    eng = _engine(rank, world, os.path.join(tmp, f"m{rank}.x"), optimizer)
    eng.accumulate()
    torch.save([p.grad for p in eng.params], os.path.join(tmp, f"grad{rank}.pt"))
    eng.opt.zero_grad(set_to_none=True)
    for _ in range(3):
        eng.train_step()
    torch.save([p.detach() for p in eng.params], os.path.join(tmp, f"weights{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_two_ranks_match_one_process_and_stay_in_sync(tmp_path, optimizer):
    mp.spawn(_worker, args=(2, str(tmp_path), optimizer), nprocs=2, join=True)
    single = _engine(0, 1, tmp_path / "single.x", optimizer)
    single.accumulate()
    for rank in (0, 1):
        for g, want in zip(torch.load(tmp_path / f"grad{rank}.pt"), [p.grad for p in single.params]):
            torch.testing.assert_close(g, want, atol=1e-6, rtol=0)
    w0, w1 = torch.load(tmp_path / "weights0.pt"), torch.load(tmp_path / "weights1.pt")
    single.opt.zero_grad(set_to_none=True)
    for _ in range(3):
        single.train_step()
    for a, b, s in zip(w0, w1, single.params):
        assert torch.equal(a, b)                                   # the ranks never drift apart
        if optimizer == "adamw":                                   # and train as one process does
            torch.testing.assert_close(a, s.detach(), atol=1e-5, rtol=0)
    if optimizer == "muon":    # its bf16 Newton-Schulz amplifies the rounding of a sum taken in another order
        flat = lambda ts: torch.cat([t.detach().flatten() for t in ts])   # noqa: E731
        start = flat(_model().parameters())
        moved = (flat(single.params) - start).norm()
        assert (flat(w0) - flat(single.params)).norm() < 0.03 * moved and moved > 0
