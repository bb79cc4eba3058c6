"""Build the hand-written SQuAD v1.1-style QA fixture: train.json (9 paragraphs) and dev.json (3 other paragraphs).

Every answer is located with str.find in its context (each answer text must occur exactly once there, so the
offset is unambiguous) and checked with context[start:start + len(text)] == text.

    .venv/bin/python examples/qa_toy/build.py
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (title, context, [(question, answer_text), ...])
TRAIN = [
    ("Nile",
     "The Nile is a major river in northeastern Africa. It flows north for about 6,650 kilometres and empties "
     "into the Mediterranean Sea. Its two main tributaries, the White Nile and the Blue Nile, meet near Khartoum, "
     "the capital of Sudan.",
     [("In which part of Africa is the Nile?", "northeastern Africa"),
      ("How long is the Nile?", "about 6,650 kilometres"),
      ("Into which sea does the Nile empty?", "the Mediterranean Sea"),
      ("Where do the White Nile and the Blue Nile meet?", "near Khartoum"),
      ("Khartoum is the capital of which country?", "Sudan")]),
    ("Photosynthesis",
     "Photosynthesis is the process by which green plants turn light into chemical energy. It takes place mainly "
     "in the chloroplasts of leaf cells, which contain a green pigment called chlorophyll. The plant takes in "
     "carbon dioxide and water and releases oxygen as a by-product.",
     [("What do green plants turn light into during photosynthesis?", "chemical energy"),
      ("Where does photosynthesis mainly take place?", "in the chloroplasts of leaf cells"),
      ("What is the green pigment called?", "chlorophyll"),
      ("What gas does the plant take in?", "carbon dioxide"),
      ("What is released as a by-product?", "oxygen")]),
    ("Printing press",
     "Johannes Gutenberg introduced movable-type printing to Europe around 1450 in the city of Mainz. His most "
     "famous work is a Latin Bible, of which about 180 copies were printed. The new presses made books much "
     "cheaper and helped spread literacy across the continent.",
     [("Who introduced movable-type printing to Europe?", "Johannes Gutenberg"),
      ("When was movable-type printing introduced to Europe?", "around 1450"),
      ("In which city did Gutenberg work?", "Mainz"),
      ("In what language was his famous Bible written?", "Latin"),
      ("How many copies of the Bible were printed?", "about 180"),
      ("What did the presses help spread?", "literacy")]),
    ("Marathon",
     "The marathon is a long-distance running race over 42.195 kilometres. The event is named after a legend "
     "about a Greek messenger who ran from the battlefield of Marathon to Athens. The modern distance was fixed "
     "after the 1908 London Olympics, where the course ended in front of the royal box.",
     [("How long is a marathon?", "42.195 kilometres"),
      ("Who is the legend about?", "a Greek messenger"),
      ("To which city did the messenger run?", "Athens"),
      ("After which Olympics was the modern distance fixed?", "the 1908 London Olympics"),
      ("Where did the 1908 course end?", "in front of the royal box")]),
    ("Bread",
     "To bake a simple loaf of bread, mix flour, water, salt and yeast into a dough. Knead the dough for about "
     "ten minutes and let it rise in a warm place until it doubles in size. Bake it in a hot oven at 220 degrees "
     "Celsius for around half an hour.",
     [("What makes bread rise?", "yeast"),
      ("How long should the dough be kneaded?", "about ten minutes"),
      ("Where should the dough rise?", "in a warm place"),
      ("How much should the dough grow?", "until it doubles in size"),
      ("At what temperature is the bread baked?", "220 degrees Celsius"),
      ("How long does the bread bake?", "around half an hour")]),
    ("Mount Everest",
     "Mount Everest is the highest mountain above sea level, with a summit at 8,849 metres. It lies in the "
     "Himalayas on the border between Nepal and China. Edmund Hillary and Tenzing Norgay were the first climbers "
     "confirmed to reach the top, in May 1953.",
     [("How high is the summit of Mount Everest?", "8,849 metres"),
      ("In which mountain range is Everest?", "the Himalayas"),
      ("Everest lies on the border between China and which country?", "Nepal"),
      ("Who climbed Everest together with Tenzing Norgay?", "Edmund Hillary"),
      ("When did climbers first reach the top?", "May 1953")]),
    ("Honey bees",
     "Honey bees live in colonies that can hold up to 60,000 workers and a single queen. Workers collect nectar "
     "from flowers and store it as honey in wax cells shaped like hexagons. Scout bees tell the others where food "
     "is with a movement known as the waggle dance.",
     [("How many workers can a colony hold?", "up to 60,000"),
      ("How many queens does a colony have?", "a single queen"),
      ("What do workers collect from flowers?", "nectar"),
      ("What shape are the wax cells?", "hexagons"),
      ("How do scout bees share where food is?", "the waggle dance")]),
    ("Steam engine",
     "James Watt improved the steam engine in 1769 by adding a separate condenser. This change saved a great "
     "deal of fuel, so engines became practical for factories and mines. The unit of power, the watt, is named "
     "in his honour.",
     [("Who improved the steam engine?", "James Watt"),
      ("In what year was the steam engine improved?", "1769"),
      ("What part did Watt add?", "a separate condenser"),
      ("Where did the engines become practical?", "for factories and mines"),
      ("Which unit is named after him?", "the watt")]),
    ("Chess",
     "Chess is a strategy game for two players on a board of 64 squares. Each player starts with sixteen pieces, "
     "including one king, which must be protected at all costs. A game is won by checkmate, when the king is "
     "attacked and has no legal move to escape.",
     [("How many players does chess have?", "two players"),
      ("How many squares does the board have?", "64 squares"),
      ("How many pieces does each player start with?", "sixteen pieces"),
      ("Which piece must be protected?", "one king"),
      ("How is a chess game won?", "by checkmate")]),
]

DEV = [
    ("Amazon rainforest",
     "The Amazon rainforest covers most of the Amazon basin in South America. About sixty percent of the forest "
     "is in Brazil, followed by Peru and Colombia. It is home to millions of insect species and is often called "
     "the lungs of the planet.",
     [("On which continent is the Amazon rainforest?", "South America"),
      ("Which country has most of the forest?", "Brazil"),
      ("What share of the forest is in Brazil?", "About sixty percent"),
      ("What is the forest often called?", "the lungs of the planet"),
      ("How many insect species live there?", "millions")]),
    ("Tennis",
     "Wimbledon is the oldest tennis tournament in the world and was first played in 1877. It takes place every "
     "summer in London and is the only major still played on grass courts. Players must wear almost entirely "
     "white clothing.",
     [("What is the oldest tennis tournament?", "Wimbledon"),
      ("When was Wimbledon first played?", "1877"),
      ("In which city is Wimbledon held?", "London"),
      ("What surface is Wimbledon played on?", "grass courts"),
      ("What colour must players wear?", "white")]),
    ("Moon",
     "The Moon is the only natural satellite of the Earth and orbits it roughly every 27 days. Its gravity causes "
     "most of the ocean tides. In July 1969 the Apollo 11 mission landed the first humans on its surface, and Neil "
     "Armstrong was the first to step out.",
     [("How often does the Moon orbit the Earth?", "roughly every 27 days"),
      ("What does the Moon's gravity cause?", "most of the ocean tides"),
      ("Which mission first landed humans on the Moon?", "the Apollo 11 mission"),
      ("When did the first humans land on the Moon?", "July 1969"),
      ("Who was the first to step out?", "Neil Armstrong")]),
]


def build(paragraphs, prefix):
    data, n = [], 0
    for p, (title, context, qas) in enumerate(paragraphs):
        items = []
        for q, (question, text) in enumerate(qas):
            assert context.count(text) == 1, f"{title}: answer {text!r} occurs {context.count(text)} times"
            start = context.find(text)
            assert context[start:start + len(text)] == text
            items.append({"id": f"{prefix}-{p:02d}-{q}", "question": question,
                          "answers": [{"text": text, "answer_start": start}]})
            n += 1
        data.append({"title": title, "paragraphs": [{"context": context, "qas": items}]})
    return {"version": "1.1", "data": data}, n


def check(path):
    """Re-read a written file and check every answer offset."""
    n = 0
    for article in json.loads(path.read_text(encoding="utf-8"))["data"]:
        for para in article["paragraphs"]:
            ctx = para["context"]
            for qa in para["qas"]:
                for a in qa["answers"]:
                    assert ctx[a["answer_start"]:a["answer_start"] + len(a["text"])] == a["text"], qa["id"]
                    n += 1
    return n


if __name__ == "__main__":
    assert not {t for t, _, _ in TRAIN} & {t for t, _, _ in DEV}
    for name, paragraphs, prefix in (("train", TRAIN, "tr"), ("dev", DEV, "dv")):
        squad, n = build(paragraphs, prefix)
        out = HERE / f"{name}.json"
        out.write_text(json.dumps(squad, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"{out.name}: {len(paragraphs)} paragraphs, {n} questions, {check(out)} answers verified")
