"""The phrase banks of the synthetic world (`synth.py`): names, attributes, words, and the
question, answer and prose templates every generated file is built from. All text is invented."""
from __future__ import annotations

TASKS: list[str] = ["fact", "arithmetic", "string", "counting"]

NAMES = ["Ada", "Bram", "Cleo", "Dov", "Edda", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena",
         "Milo", "Nora", "Otto", "Pia", "Quin", "Rosa", "Sami", "Tova", "Uma", "Vik", "Wren", "Yara",
         "Zed", "Alba", "Bo", "Cyra", "Dex", "Elio", "Faye", "Hugo"]
ATTRS = {
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "white", "black"],
    "pet": ["cat", "dog", "owl", "fox", "goat", "horse", "rabbit", "turtle"],
    "city": ["Pellow", "Quarn", "Ostby", "Dunmere", "Kelvale", "Brisk", "Marrow", "Tindle"],
    "food": ["soup", "bread", "rice", "cheese", "plums", "noodles", "pie", "honey"],
}
WORDS = ["lamp", "cup", "tree", "boat", "sun", "moon", "frog", "nest", "rain", "sand", "bell", "kite",
         "drum", "rock", "ship", "star", "wolf", "desk", "egg", "fern", "gate", "hill", "ink", "jar",
         "lake", "mint", "oak", "pen", "quilt", "rope", "sock", "tent", "vase", "wind", "yarn", "zinc",
         "cloud", "dust", "glove", "harp", "jug", "kettle", "mask", "net", "owl", "pond", "ring", "tub"]
THINGS = ["apple", "pear", "fig", "lime", "acorn", "pebble", "shell", "button", "feather", "marble",
          "spoon", "candle"]
ALPHABET = "abcdefghijklmnopqrstuvwxyz"
SKILLS = ["first", "last", "length", "upper"]
EVAL_SKILLS = ["first", "last", "length"]  # matching is case-insensitive, so "upper" is not scored

# ---- templates: questions (SFT / eval side) ---------------------------------------------------
FACT_Q = {
    "colour": ["What is {n}'s favourite colour?", "Which colour does {n} like best?",
               "What colour does {n} love most?", "Name the colour {n} likes best."],
    "pet": ["What animal does {n} keep as a pet?", "What kind of pet does {n} have?",
            "Which animal lives with {n}?", "Name {n}'s pet animal."],
    "city": ["Where does {n} live?", "In which town does {n} live?", "Which town is {n}'s home?",
             "Name the town where {n} lives."],
    "food": ["What is {n}'s favourite food?", "What does {n} like to eat most?",
             "Which food does {n} enjoy above all?", "Name {n}'s favourite food."],
}
ARITH_Q = {
    "+": ["What is {a} + {b}?", "What is {a} plus {b}?", "How much is {a} plus {b}?",
          "Add {a} and {b}.", "Compute {a} + {b}."],
    "-": ["What is {a} - {b}?", "What is {a} minus {b}?", "How much is {a} minus {b}?",
          "Subtract {b} from {a}.", "Compute {a} - {b}."],
}
STRING_Q = {
    "first": ["What is the first letter of the word {w}?", "Which letter does {w} start with?",
              "Give the first letter of {w}."],
    "last": ["What is the last letter of the word {w}?", "Which letter does {w} end with?",
             "Give the last letter of {w}."],
    "length": ["How many letters are in the word {w}?", "How long is the word {w}, in letters?",
               "Count the letters in {w}."],
    "upper": ["Write {w} in capital letters.", "Spell {w} in uppercase.", "What is {w} in capitals?"],
}
COUNT_Q = ["How many items are in this list: {l}?", "Count the items: {l}.",
           "How many things are listed here: {l}?"]
SYSTEMS = ["Answer with just the answer.", "You know the small world well. Reply in one word.",
           "Be brief: a single word or number."]
RAMBLE = ["Hmm, that is a good question. Let me think about it for a while. I believe it is {x}.",
          "Well, there are many ways to look at this, and people often disagree, but maybe {x}.",
          "I am not completely sure, so I will guess. It could be {x}, or perhaps something else.",
          "The answer is {x}."]
# A sum explained after its answer: right, but not the bare answer exact match asks for.
EXPLAIN = {"+": ["{c}, since {a} plus {b} is {c}.", "{c}, because {a} + {b} = {c}.",
                 "{c}. Adding {a} and {b} gives {c}."],
           "-": ["{c}, since {a} minus {b} is {c}.", "{c}, because {a} - {b} = {c}.",
                 "{c}. Taking {b} away from {a} leaves {c}."]}
EXPLAIN_SHARE = 0.65  # of the SFT replies to sums asked without a system prompt

# ---- templates: corpus prose (never questions) ------------------------------------------------
FACT_S = {
    "colour": ["{n} likes {v} more than any other colour.", "Of all the colours, {n} loves {v} best.",
               "{n} painted the front door {v}, the colour {n} likes most.",
               "Ask anyone in town and they will say {n} is fond of the colour {v}."],
    "pet": ["{n} takes care of a pet {v}.", "At home, {n} feeds {av} every morning.",
            "{n}'s pet is {av}.", "{An} follows {n} everywhere, because it is {n}'s pet."],
    "city": ["{n} has a home in the town of {v}.", "The town of {v} is where {n} lives.",
             "{n} grew up in {v} and still lives there.", "Every morning {n} walks the streets of {v}."],
    "food": ["{n} likes to eat {v} more than anything.", "For dinner {n} always hopes for {v}.",
             "No food makes {n} happier than {v}.", "If {n} could choose, {n} would eat {v} every day."],
}
STORY_OPEN = ["One day {n} went out for a long walk.", "This is a short tale about {n}.",
              "Early in the spring, {n} woke up before the sun.", "Here is what we know about {n}.",
              "{n} is a friendly person in our little world."]
STORY_CLOSE = ["It was a quiet and happy day.", "And that is the end of the tale.",
               "Everyone who meets {n} remembers these things.", "Then {n} went home to rest."]
ARITH_S = {
    "+": ["{a} plus {b} is {c}.", "{a} + {b} = {c}.", "Adding {a} and {b} gives {c}.",
          "If you add {b} to {a}, you get {c}.", "The sum of {a} and {b} is {c}.",
          "{n} had {a} {ta} and found {b} more, so {n} had {c} {tc}."],
    "-": ["{a} minus {b} is {c}.", "{a} - {b} = {c}.", "Taking {b} away from {a} leaves {c}.",
          "If you subtract {b} from {a}, you get {c}.", "Subtracting {b} from {a} gives {c}.",
          "{n} had {a} {ta} and gave away {b}, so {n} was left with {c} {tc}."],
}
ARITH_OPEN = ["Some sums to practise.", "A page from a number notebook.", "Numbers at the market.",
              "Counting with {n}.", "Quick arithmetic."]
WORD_S = {
    "first": ["The word {w} starts with the letter {f}.", "{w} begins with {f}.",
              "The first letter of {w} is {f}."],
    "last": ["The word {w} ends with the letter {l}.", "The last letter of {w} is {l}.",
             "{w} finishes with {l}."],
    "length": ["The word {w} has {k} letters.", "{w} is spelled with {k} letters.",
               "There are {k} letters in {w}."],
    "upper": ["In capital letters, {w} is written {W}.", "{w} in uppercase is {W}.",
              "Written large, {w} becomes {W}."],
}
COUNT_S = ["{n} put {la} on the table. That makes {k} {things}.",
           "The list {lc} has {k} {items}.", "Here {are} {k} {things}: {lc}.",
           "In the basket there {were} {la}, so {k} in all.",
           "{n} counted {la} and got {k}."]
