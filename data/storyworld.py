#> L06 storyworld
"""
storyworld.py -- the built-in corpus: short children's stories from a seed.

Why synthetic? A 1M-parameter model on a laptop CPU cannot learn Wikipedia in
minutes, but it can learn a small world with consistent rules: characters,
places, objects with colours and sizes, and simple events (find, lose, give,
go, feel, help). Because we generate each story we also know its facts, so the
same world yields tasks with exact answers for later lessons:

    story_questions(story)  -> [(question, answer)]     SFT, eval (lesson 09-10)
    multiple_choice(story)  -> [(question, options, k)] eval by log-likelihood
    arithmetic(rng)         -> (question, answer)       a base model's exact match (lesson 09)
    preference_pairs(story) -> [(prompt, chosen, rejected)]   DPO, reward model

Everything is a pure function of the seed: story i of seed s is always the
same, so a train/val split by story index measures generalisation to new
combinations of the same rules.

    python data/storyworld.py --stories 3          # print a few, with questions
"""

import argparse
import math
import random
from dataclasses import dataclass, field

# The world's vocabulary. Names are gendered only through the pronoun table.
NAMES = {
    "she": ["Lily", "Mia", "Anna", "Sara", "Emma", "Zoe", "Lucy", "Nora", "Ella", "Ruby", "Ivy",
            "Maya", "Rosa", "Kim", "Amy", "Jade", "Luna", "Hana", "Tess", "Olga"],
    "he": ["Tom", "Max", "Ben", "Sam", "Leo", "Jack", "Finn", "Omar", "Noah", "Theo", "Hugo",
           "Eli", "Ravi", "Kai", "Jon", "Ivan", "Luca", "Pablo", "Ned", "Otto"],
}
KINDS = ["girl", "boy", "rabbit", "fox", "bear", "cat", "dog", "duck", "mouse", "owl", "frog",
         "turtle", "squirrel", "pig", "lamb", "robot"]
PLACES = ["the park", "the forest", "the garden", "the beach", "the river", "the farm",
          "the hill", "the town", "the school", "the kitchen", "the library", "the market",
          "the lake", "the cave", "the meadow", "the playground"]
OBJECTS = ["ball", "kite", "hat", "book", "cup", "box", "shell", "key", "drum", "boat", "bell",
           "scarf", "apple", "stone", "feather", "spoon", "map", "lamp"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "pink", "white", "black", "brown"]
SIZES = ["small", "big", "tiny", "huge", "little", "long"]
FEELINGS = {"good": ["happy", "glad", "proud", "excited", "calm"],
            "bad": ["sad", "scared", "worried", "tired", "angry"]}
WEATHER = ["sunny", "rainy", "windy", "cold", "warm", "cloudy"]
TIMES = ["One day", "One morning", "One evening", "Last summer", "On a {w} day", "Early one morning"]
PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "him", "his")}


@dataclass
class Character:
    name: str
    kind: str
    gender: str

    @property
    def they(self):
        return PRONOUNS[self.gender][0]

    @property
    def their(self):
        return PRONOUNS[self.gender][2]


@dataclass
class Story:
    text: str
    facts: dict = field(default_factory=dict)  # what questions can ask, with exact answers


# -----------------------------------------------------------------------------
# One story, with its state tracked as it is told


def make_character(rng, taken=()):
    gender = rng.choice(["she", "he"])
    name = rng.choice([n for n in NAMES[gender] if n not in taken])
    kind = rng.choice([k for k in KINDS if (gender, k) not in (("she", "boy"), ("he", "girl"))])
    return Character(name, kind, gender)


def generate_story(rng):
    """One story from a random.Random. The facts record the state each event changes:
    where the object was found, who holds it at the end, how each character felt."""
    hero = make_character(rng)
    friend = make_character(rng, taken={hero.name})
    home, place, end_place = rng.sample(PLACES, 3)
    size, colour, obj = rng.choice(SIZES), rng.choice(COLOURS), rng.choice(OBJECTS)
    thing = f"{size} {colour} {obj}"
    when = rng.choice(TIMES).format(w=rng.choice(WEATHER))
    glad, sad = rng.choice(FEELINGS["good"]), rng.choice(FEELINGS["bad"])
    lost = rng.choice([o for o in OBJECTS if o != obj])
    s = []
    say = lambda *variants: s.append(rng.choice(variants))  # one sentence, in one of its wordings
    say(
        f"Once upon a time, there was a {hero.kind} named {hero.name}.",
        f"There was once a {hero.kind} called {hero.name}.",
        f"{hero.name} was a {hero.kind} who lived near {home}.",
    )
    say(
        f"{when}, {hero.name} went to {place}.",
        f"{when}, {hero.name} walked to {place} to play.",
        f"{when}, {hero.name} wanted to visit {place}.",
    )
    # The place of the find is named three times (the walk, the find, the meeting), the
    # friend's kind also after the friend's name ("Zoe the rabbit"), and the lost thing always
    # after "had lost her". The base model copies names but neither places nor colours (its
    # loss at a repeated place is ln 16: a guess), so lesson 10's SFT builds those lookups
    # itself; with the place named once and the kind only before the name, whether it built
    # them in 2,500 steps was decided by the order of the training chats.
    say(
        f"At {place}, {hero.they} found a {thing}.",
        f"On the ground at {place}, {hero.name} saw a {thing} and picked it up.",
        f"Under a tree at {place}, {hero.name} found a {thing}.",
    )
    s.append(f"{hero.name} felt {glad}.")
    say(
        f"Then {hero.name} met a {friend.kind} named {friend.name} at {place}.",
        f"Soon a {friend.kind} called {friend.name} came to {place}.",
    )
    say(
        f"{friend.name} the {friend.kind} was {sad} because {friend.they} had lost {friend.their} {lost}.",
        f"{friend.name} the {friend.kind} looked {sad}: {friend.they} had lost {friend.their} {lost}.",
    )
    gives = rng.random() < 0.5  # the branch decides who holds the object at the end
    if gives:
        say(
            f"{hero.name} wanted to help, so {hero.they} gave the {colour} {obj} to {friend.name}.",
            f"\"You can have my {obj},\" said {hero.name}, and {hero.they} gave it to {friend.name}.",
        )
        s.append(f"{friend.name} said, \"Thank you, {hero.name}!\"")
        owner, friend_feels = friend, rng.choice(FEELINGS["good"])
    else:
        say(
            f"{hero.name} helped {friend.name} look for the {lost}.",
            f"\"I will help you,\" said {hero.name}. They looked for the {lost} together.",
        )
        s.append(f"They found the {lost} near {rng.choice(['a big rock', 'the old tree', 'a bush', 'the water'])}.")
        owner, friend_feels = hero, rng.choice(FEELINGS["good"])
    s.append(f"{friend.name} felt {friend_feels}.")
    say(
        f"Together they went to {end_place}.",
        f"Then the two friends went to {end_place} to play.",
    )
    say(
        f"In the end, {owner.name} had the {colour} {obj}, and everyone was {glad}.",
        f"At the end of the day, the {colour} {obj} was with {owner.name}.",
    )
    facts = {"hero": hero.name, "hero_kind": hero.kind, "friend": friend.name,
             "friend_kind": friend.kind, "found_at": place, "end_place": end_place,
             "object": obj, "colour": colour, "size": size, "lost": lost, "owner": owner.name,
             "hero_felt": glad, "friend_feels_bad": sad, "friend_they": friend.they,
             "friend_their": friend.their, "gave": gives}
    return Story(" ".join(s), facts)


def count_stories():
    """log10 of how many distinct stories the generator can tell: the product of the
    independent choices along one path (characters, places, the object, time, feelings,
    the lost thing, the branch, and 3 or 2 template variants for 10 sentences)."""
    names, kinds = len(NAMES["she"]) + len(NAMES["he"]), len(KINDS) - 1
    count = (names * (names - 1) * kinds ** 2 * len(PLACES) * (len(PLACES) - 1) * (len(PLACES) - 2)
             * len(OBJECTS) * len(COLOURS) * len(SIZES) * (len(TIMES) - 1 + len(WEATHER))
             * len(FEELINGS["good"]) ** 2 * len(FEELINGS["bad"]) * (len(OBJECTS) - 1) * 2
             * 3 ** 3 * 2 ** 7)
    return math.log10(count)


def stories(seed, start, count):
    """Stories start..start+count-1 of a seed; story i depends only on (seed, i)."""
    for i in range(start, start + count):
        yield generate_story(random.Random(f"{seed}-{i}"))


# -----------------------------------------------------------------------------
# Tasks with exact answers, for evaluation and the later stages


# The six questions: each with the template of its exact answer and the fact it asks for.
# Three answers are the bare fact; three are in the story's own words, because the base model
# copies names but not places (lessons.md, lesson 10), and a reply's first word has no space
# before it, so a bare answer starts with tokens the story never holds:
# - "the park" at a reply's start is the rare pieces "t" "he"; in "At the park." the place
#   follows the story's own " the", as the story says it ("At the park, she found a ...").
# - "Omar lost his drum." repeats "lost his" from the story's "had lost his drum", so the
#   next word is a copy of what followed the same words before: an induction head's job.
#   Every story has two objects, so it is still the lookup an SFT run may only partly form.
# - "Zoe" is not the token " Zoe" that the story holds. In "At the end, it was with Zoe." it
#   is, after words the story uses (half the stories end "was with Zoe", the rest "In the
#   end, Zoe had").
#   subtle: "it", not "the ball": copying the object from the question would be one more
#   lookup to learn.
QUESTIONS = [
    ("Where did {hero} find the {object}?", "At {found_at}.", "found_at"),
    ("What colour was the {object}?", "{colour}", "colour"),
    ("Who had the {object} at the end?", "At the end, it was with {owner}.", "owner"),
    ("What did {friend} lose?", "{friend} lost {friend_their} {lost}.", "lost"),
    ("What kind of animal or person was {friend}?", "a {friend_kind}", "friend_kind"),
    ("How did {hero} feel after finding the {object}?", "{hero_felt}", "hero_felt"),
]


def story_questions(story):
    """[(question, exact answer)] about one story, in the order of QUESTIONS."""
    return [(q.format(**story.facts), a.format(**story.facts)) for q, a, _ in QUESTIONS]


def wrong_choices(facts):
    """For each fact a question asks about: the values of its type, the right one among
    them. Wrong answers come from here, so they are plausible (a place for a place)."""
    return {"found_at": PLACES, "colour": COLOURS, "owner": [facts["hero"], facts["friend"]],
            "lost": OBJECTS, "friend_kind": KINDS,
            "hero_felt": FEELINGS["good"] + FEELINGS["bad"]}


def multiple_choice(story, rng):
    """Four options per question, one right, distractors of the same type."""
    f = story.facts
    items = []
    for question, _, key in QUESTIONS[:4]:
        right = f[key]
        wrong = [o for o in wrong_choices(f)[key] if o != right]
        options = rng.sample(wrong, min(3, len(wrong))) + [right]
        if key == "owner":  # only two people in the story: add two outsiders
            options += rng.sample([n for n in NAMES["she"] + NAMES["he"] if n not in options], 2)
        rng.shuffle(options)
        items.append((question.format(**f), options, options.index(right)))
    return items


def arithmetic(rng, digits=2):
    """A sum, difference or product with a verifiable integer answer."""
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    op = rng.choice("+-*")
    return f"What is {a} {op} {b}?", str({"+": a + b, "-": a - b, "*": a * b}[op])


def preference_pairs(story, rng):
    """(prompt, chosen, rejected): the right answer versus the same answer with a
    plausible wrong fact in it ("At the end, it was with Tom." for "... with Zoe.")."""
    f, pairs = story.facts, []
    for question, answer, key in QUESTIONS:
        wrong = rng.choice([v for v in wrong_choices(f)[key] if v != f[key]])
        pairs.append((f"{story.text}\nQuestion: {question.format(**f)}\nAnswer:",
                      " " + answer.format(**f), " " + answer.format(**{**f, key: wrong})))
    return pairs


#> L10 sft-data
# -----------------------------------------------------------------------------
# Conversations for supervised fine-tuning (lesson 10), in the chat format:
# lists of {"role", "content"} messages, the assistant's answers exact.

SYSTEM_PROMPTS = ["You answer questions about stories.", "Answer in a few words.",
                  "You are a helpful assistant."]


def question_turn(story, question):
    """The user's content for a question about a story: the question, then the story.

    Question first because attention only looks back: the model reads the story
    already knowing what it will be asked (lesson 10's Try puts the story first).
    >>> question_turn(Story("Tom had a cat."), "Who had a cat?")
    'Question: Who had a cat?\\nTom had a cat.'
    """
    return f"Question: {question}\n{story.text}"


def turn(role, content):
    return {"role": role, "content": content}


def story_conversation(story, rng, questions=1):
    """A chat about one story: the story and a first question, then follow-up questions
    (each answered exactly); one time in five a system message comes first."""
    chat = [turn("system", rng.choice(SYSTEM_PROMPTS))] if rng.random() < 0.2 else []
    for k, (question, answer) in enumerate(rng.sample(story_questions(story), questions)):
        chat += [turn("user", question_turn(story, question) if k == 0 else question),
                 turn("assistant", answer)]
    return chat


def sft_sets(seed, train_stories, val_stories):
    """The built-in SFT data, split by story like the pretraining corpus: stories
    0..train_stories-1 (pretraining's train split) for training, the next
    val_stories (its val split, never trained on by either stage) held out.

    train / val:  one conversation per story -- a third a single question, the rest
                  all six questions about the same story in a random order (six
                  supervised answers for one story's tokens).
    eval_story:   one question per held-out story, no system message (exact match).
    adapt / eval_which: lesson 14's adaptation task (adapt_sets, below).

    No sums: with 5,000 of them mixed in, the 0.9M model answered 1.5% of unseen ones after
    SFT, so they took a share of every batch and taught nothing.
    """
    rng = random.Random(f"{seed}-sft")

    def chats(start, count):
        return [story_conversation(s, rng, 1 if rng.random() < 1 / 3 else len(story_questions(s)))
                for s in stories(seed, start, count)]

    train, val = chats(0, train_stories), chats(train_stories, val_stories)
    eval_story = [[turn("user", question_turn(s, q)), turn("assistant", a)]
                  for s in stories(seed, train_stories, val_stories)
                  for q, a in [rng.choice(story_questions(s))]]
    sets = {"train": train, "val": val, "eval_story": eval_story}
    #> L12 edge-data
    sets |= edge_sets(seed, train_stories, val_stories)  # lessons 12-13's: lost, eval_lost, and a control
    #< L12
    #> L14 adapt-data
    sets |= adapt_sets(seed, train_stories, val_stories)  # lesson 14's: adapt and eval_which
    #< L14
    return sets
#< L10
#> L12 edge-data


# -----------------------------------------------------------------------------
# The task at the edge of the model's skill, for PPO and GRPO (lessons 12-13): lesson 10's
# "What did Omar lose?", asked about every story. Of lesson 10's six lookups it is the one SFT
# may form only partly (each story names two objects, and the answer must be the friend's):
# the default SFT model is right greedily on 87% of held-out questions and in some of 8
# samples on 96% (pass@8), so a reward has wrong answers to push down where greedy errs.
# The control is a lookup SFT never formed: "What kind of animal or person was Emma?" about
# the hero. Lesson 10 asks it only about the friend, and the SFT model answers with the
# friend's kind: none of 1,600 held-out samples is right, and GRPO draws no right answer for
# 120 iterations, then learns a little, dearly (lesson 13).


def hero_kind_question(story):
    """(question, exact answer) of the control; None when both characters are of one kind.

    >>> hero_kind_question(Story("", {"hero": "Tom", "hero_kind": "fox", "friend_kind": "owl"}))
    ('What kind of animal or person was Tom?', 'a fox')
    """
    f = story.facts
    if f["hero_kind"] == f["friend_kind"]:  # the friend's kind would be right too
        return None
    return f"What kind of animal or person was {f['hero']}?", f"a {f['hero_kind']}"


def lost_question(story):
    """(question, exact answer): lesson 10's question about what the friend lost."""
    question, answer = next((q, a) for q, a, key in QUESTIONS if key == "lost")
    return question.format(**story.facts), answer.format(**story.facts)


def edge_sets(seed, train_stories, val_stories, prompts=3000):
    """lost: RL's prompts, the lost question about each of the first `prompts` training
    stories; eval_lost: about each held-out story. herokind, eval_herokind: the same for the
    control (stories whose two characters are of one kind skipped)."""
    prompts = min(prompts, train_stories)  # subtle: past train_stories the stories are held out

    def chats(start, count, ask):
        asked = [(s, ask(s)) for s in stories(seed, start, count)]
        return [[turn("user", question_turn(s, qa[0])), turn("assistant", qa[1])] for s, qa in asked if qa]

    return {"lost": chats(0, prompts, lost_question), "eval_lost": chats(train_stories, val_stories, lost_question),
            "herokind": chats(0, prompts, hero_kind_question),
            "eval_herokind": chats(train_stories, val_stories, hero_kind_question)}
#< L12
#> L14 adapt-data


# -----------------------------------------------------------------------------
# Lesson 14's adaptation task: the same facts asked in a new family of questions, every
# one beginning "Which", so the kind of question is told by its second word. The lookups
# and the answers are the lesson-10 model's own; what is new is reading the question:
# the kind of change LoRA is meant for (Hu et al. 2021: adapting a capable model is a
# low-rank update). The answers are QUESTIONS' answers, word for word.

WHICH = {"found_at": "Which place did {hero} find the {object} at?", "colour": "Which colour did the {object} have?",
         "owner": "Which of the two had the {object} at the end?", "lost": "Which thing did {friend} lose?",
         "friend_kind": "Which kind of animal or person was {friend}?",
         "hero_felt": "Which feeling did {hero} have after finding the {object}?"}


def which_questions(story):
    """[(question, exact answer)] about one story, in the order of QUESTIONS.

    >>> story = next(stories(1337, 0, 1))
    >>> [a for _, a in which_questions(story)] == [a for _, a in story_questions(story)]
    True
    """
    return [(WHICH[key].format(**story.facts), a.format(**story.facts)) for _, a, key in QUESTIONS]


def adapt_sets(seed, train_stories, val_stories, new=3000, old=3000):
    """The adaptation set: `new` chats of Which-questions about training stories (a third
    one question, the rest all six) mixed with `old` chats of lesson 10's questions, so
    that what the model already does is rehearsed, not forgotten; and eval_which, one
    Which-question per held-out story (the stories no stage trains on)."""
    rng = random.Random(f"{seed}-adapt")

    def chat(story, questions):
        out = []
        for k, (question, answer) in enumerate(rng.sample(which_questions(story), questions)):
            out += [turn("user", question_turn(story, question) if k == 0 else question), turn("assistant", answer)]
        return out

    mixed = [chat(s, 1 if rng.random() < 1 / 3 else len(QUESTIONS)) for s in stories(seed, 0, new)]
    mixed += [story_conversation(s, rng, len(QUESTIONS)) for s in stories(seed, new, old)]
    rng.shuffle(mixed)
    held_out = [[turn("user", question_turn(s, q)), turn("assistant", a)]
                for s in stories(seed, train_stories, val_stories) for q, a in [rng.choice(which_questions(s))]]
    return {"adapt": mixed, "eval_which": held_out}
#< L14


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Print stories of the built-in world.")
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--stories", type=int, default=3)
    args = ap.parse_args()
    for story in stories(args.seed, 0, args.stories):
        print(story.text, "\n")
    print(f"this world can tell about 10^{count_stories():.0f} distinct stories")
#< L06
