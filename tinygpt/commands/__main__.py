"""`python -m tinygpt.commands`: print docs/commands.md (every command and option, generated)."""
from . import reference_markdown

print(reference_markdown())
