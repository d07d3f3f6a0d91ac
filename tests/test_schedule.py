import math

import pytest

from smi_engine.errors import SmiError
from smi_engine.schedule import SEED_SCHEDULE_TEXT, Schedule, Stop, block_flops, kept_at, speedup_bound


def test_parse_round_trips_and_dense():
    schedule = Schedule.parse(SEED_SCHEDULE_TEXT)
    assert schedule.stops == (Stop(50, 0.3), Stop(100, 0.3), Stop(200, 0.3), Stop(300, 0.3))
    assert str(schedule) == SEED_SCHEDULE_TEXT
    assert Schedule.parse("dense").is_dense and Schedule.parse("DENSE").is_dense


def test_kept_counts_floor_the_remaining_patches():
    # DeiT 224/16: 196 patches; floor(196*.7)=137, floor(137*.7)=95, floor(95*.7)=66, floor(66*.7)=46
    assert Schedule.parse(SEED_SCHEDULE_TEXT).kept_patches(196) == [196, 137, 95, 66, 46]
    assert Schedule.parse("1:0.5,2:0.5").kept_patches(7) == [7, 3, 1]


def test_stage_lengths_and_kept_at():
    schedule = Schedule.parse("5:0.5,10:0.5")
    assert schedule.stage_lengths(20) == [5, 5, 10]
    assert [kept_at(schedule, 64, i) for i in (0, 4, 5, 9, 10, 19)] == [64, 64, 32, 32, 16, 16]


@pytest.mark.parametrize(
    "text, message",
    [
        ("50:0,100:0.3", "outside (0, 1)"),
        ("50:1.0", "outside (0, 1)"),
        ("50:-0.2", "outside (0, 1)"),
        ("100:0.3,50:0.3", "must increase"),
        ("50:0.3,50:0.3", "must increase"),
        ("0:0.3", "must increase"),
        ("50:0.3,500:0.3", "past --iterations"),
        ("1:0.9,2:0.9,3:0.9", "stops every one"),
    ],
)
def test_validation_names_the_problem(text, message):
    with pytest.raises(SmiError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Schedule.parse(text).validate(iterations=400, num_patches=64)


@pytest.mark.parametrize("text", ["50", "a:0.3", "50:x", "50;0.3"])
def test_parse_rejects_malformed_items(text):
    with pytest.raises(SmiError, match="ITERATION:RATIO"):
        Schedule.parse(text)


def test_scaled_keeps_stops_apart_and_in_proportion():
    seed = Schedule.parse(SEED_SCHEDULE_TEXT)
    assert [s.iteration for s in seed.scaled(400).stops] == [5, 10, 20, 30]
    assert [s.iteration for s in seed.scaled(40).stops] == [1, 2, 3, 4]  # never collapse onto one iteration


def test_seed_schedule_bound_matches_the_paper_on_deit_base():
    # DESIGN.md: about 3.8x for the seed schedule on DeiT-B over 4000 iterations (paper: up to 3.79x).
    bound = speedup_bound(Schedule.parse(SEED_SCHEDULE_TEXT), 4000, 196, 1, 768)
    assert 3.6 < bound < 4.0
    assert speedup_bound(Schedule(), 4000, 196, 1, 768) == pytest.approx(1.0)


def test_block_flops_counts_both_terms():
    assert block_flops(10, 4) == 24 * 10 * 16 + 4 * 100 * 4
    # Halving tokens more than halves cost through the quadratic attention term.
    assert block_flops(98, 192) < block_flops(197, 192) / 2
    assert math.isclose(block_flops(1, 1), 28)
