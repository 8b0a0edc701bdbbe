"""English sentence pairs with a graded similarity, for evaluating sentence encoders.

Written for ``examples/minilm_compress.py``: 48 pairs, each scored by hand on the
0-5 scale of the STS benchmarks (5: same meaning; 4: same meaning, a detail differs;
3: roughly equivalent, important details differ; 2: same topic, different claims;
1: loosely related; 0: unrelated). The scores are one person's judgement, so only
their ranking is meaningful (compare with a Spearman correlation).

References: Cer et al., SemEval-2017 Task 1: Semantic Textual Similarity, 2017.
"""

PAIRS: list[tuple[str, str, float]] = [
    # 5: paraphrases
    ("A man is playing a guitar.", "A man plays the guitar.", 5.0),
    ("The cat is sleeping on the sofa.", "A cat sleeps on the couch.", 5.0),
    ("She bought a new car yesterday.", "Yesterday she purchased a new car.", 5.0),
    ("The meeting has been postponed until Friday.", "The meeting was moved to Friday.", 4.8),
    ("Children are playing football in the park.", "Kids play soccer in the park.", 4.8),
    ("The train to London is late.", "The London train is delayed.", 4.8),
    ("He could not sleep because of the noise.", "The noise kept him awake.", 4.6),
    ("It is raining heavily in the city.", "There is a heavy downpour in town.", 4.6),
    # 4: same event, a detail differs
    ("A woman is slicing an onion.", "A woman is cutting a tomato.", 3.6),
    ("The dog is running across the beach.", "A dog runs along the shore with a ball.", 4.0),
    ("Two men are playing chess in the garden.", "Two old men play chess outside.", 4.0),
    ("The company reported higher profits this year.", "Profits at the firm rose this year.", 4.4),
    ("A boy is riding a bicycle down the hill.", "A girl rides a bike down a hill.", 3.6),
    ("The president spoke about the economy.", "The president gave a speech on jobs.", 3.4),
    ("The baby is crying in her crib.", "An infant cries in the cot.", 4.6),
    ("I need to buy milk and bread.", "I have to get bread from the shop.", 3.8),
    # 3: related, important details differ
    ("A man is eating a sandwich.", "A man is eating a bowl of soup.", 3.0),
    ("The museum opens at nine in the morning.", "The library opens at nine.", 2.6),
    ("She is learning to play the piano.", "She teaches piano to children.", 2.4),
    ("The river flooded the village.", "Heavy rain caused the river to rise.", 2.8),
    ("He missed the bus and walked to work.", "He drove to work this morning.", 2.0),
    ("The shop sells fresh fish every day.", "Fresh vegetables are sold at the market.", 2.2),
    ("The students are taking an exam.", "The teacher is grading the exams.", 2.6),
    ("A plane landed at the airport.", "The flight to Paris was cancelled.", 2.0),
    # 2: same topic, different claims
    ("The soup is too salty.", "I love cooking soup in winter.", 1.6),
    ("My phone battery died.", "Phones have become very expensive.", 1.4),
    ("The football team won the championship.", "Football is popular in Brazil.", 1.6),
    ("The doctor prescribed antibiotics.", "Hospitals need more nurses.", 1.4),
    ("Mountains are covered in snow in winter.", "We went skiing last winter.", 1.8),
    ("The computer crashed during the update.", "She writes software for banks.", 1.2),
    ("The garden is full of roses.", "He planted tomatoes in spring.", 1.6),
    ("Coffee prices went up again.", "She drinks tea every morning.", 1.2),
    # 1: loosely related
    ("A man is playing the flute.", "A man is eating spaghetti.", 0.6),
    ("The stars are bright tonight.", "The children are asleep.", 0.6),
    ("The king ruled the land for forty years.", "Taxes rise every year.", 0.8),
    ("The ship sailed across the sea.", "Fish live in the ocean.", 1.2),
    ("He painted the fence white.", "The house has a red door.", 1.2),
    ("A shepherd watches his sheep on the hill.", "The farmer sold his cows.", 1.6),
    # 0: unrelated
    ("The stock market fell sharply today.", "A kitten is chasing a butterfly.", 0.0),
    ("Please close the window.", "Photosynthesis happens in leaves.", 0.0),
    ("The recipe needs two eggs.", "The senator lost the election.", 0.0),
    ("My brother lives in Canada.", "The printer is out of ink.", 0.0),
    ("The concert starts at eight.", "Glaciers are melting quickly.", 0.0),
    ("She ran a marathon in three hours.", "The contract was signed by both parties.", 0.0),
    ("The bread is baking in the oven.", "Quantum computers use qubits.", 0.0),
    ("A bird is building a nest.", "The bank raised interest rates.", 0.0),
    ("Turn left at the next corner.", "The novel was translated into French.", 0.0),
    ("Water boils at one hundred degrees.", "He forgot his umbrella at the cinema.", 0.0),
]
