"""Captions the demo, benchmarks and notebooks share; none is among the default model's training captions."""

#: Calibration and held-out captions, from the default model's caption grammar (shape colours on the background
#: colours it was trained on) and never among its training captions' seeds.
CALIBRATION = [
    "a large red circle moves right on a teal background",
    "a small yellow square moves down on a black background",
    "a large white triangle stands still on a gray background",
    "a small green circle moves up on a brown background",
    "a large blue square moves left on a black background",
    "a small purple triangle moves right on a teal background",
]
HELD_OUT = [
    "a large yellow circle moves left on a gray background",
    "a small white square moves right on a brown background",
    "a large red triangle moves up on a black background",
]

#: Twelve held-out captions (the default model's caption grammar, scenes of evaluation seeds 500–511) with their noise
#: seeds: what fidelity is reported on. No plan is fitted on them, and none is a calibration caption.
EVALUATION = (
    ("a small purple triangle stands still on a teal background", 500),
    ("a small purple square moves up right on a gray background", 501),
    ("a large yellow triangle moves up on a gray background", 502),
    ("a large red square moves up on a brown background", 503),
    ("a large green circle moves up right on a teal background", 504),
    ("a small yellow square moves up left on a brown background", 505),
    ("a large purple circle moves up left on a teal background", 506),
    ("a large red square moves up on a teal background", 507),
    ("a small purple triangle moves down right on a teal background", 508),
    ("a small blue triangle moves down on a teal background", 509),
    ("a small blue triangle moves down left on a gray background", 510),
    ("a small red triangle moves down right on a black background", 511),
)
