import math

import pytest

from smi_engine.errors import SmiError
from smi_engine.inversion.schedule import SEED_SCHEDULE_TEXT, Schedule, Stop, block_flops, speedup_bound


def test_parse_round_trips_and_dense():
    schedule = Schedule.parse(SEED_SCHEDULE_TEXT)
    assert schedule.stops == (Stop(50, 0.3), Stop(100, 0.3), Stop(200, 0.3), Stop(300, 0.3))
    assert str(schedule) == SEED_SCHEDULE_TEXT
    assert Schedule.parse("dense").is_dense and Schedule.parse("DENSE").is_dense


def test_kept_counts_floor_the_remaining_patches():
    # DeiT 224/16: 196 patches; floor(196*.7)=137, floor(137*.7)=95, floor(95*.7)=66, floor(66*.7)=46
    assert Schedule.parse(SEED_SCHEDULE_TEXT).kept_patches(196) == [196, 137, 95, 66, 46]
    assert Schedule.parse("1:0.5,2:0.5").kept_patches(7) == [7, 3, 1]


def test_every_v_resolves_to_equal_shares_at_multiples_of_t_over_v():
    schedule = Schedule.parse("every:4")
    assert str(schedule) == "every:4" and not schedule.is_dense and schedule.stops == ()
    resolved = schedule.resolved(4000)
    assert [s.iteration for s in resolved.stops] == [1000, 2000, 3000] and str(resolved) == "every:4"
    assert [s.ratio for s in resolved.stops] == [0.25, 1 / 3, 0.5]  # nominal: a share of what remains
    assert schedule.kept_patches(196) == [196, 147, 98, 49]  # 49 patches per image
    # Where V does not divide N: cumulative floors, so each share is floor(N / V) or one more, the last never smaller.
    counts = Schedule.parse("every:7").kept_patches(64)
    assert counts == [64, 55, 46, 37, 28, 19, 10]
    shares = [a - b for a, b in zip(counts, counts[1:])] + [counts[-1]]
    assert shares == [9, 9, 9, 9, 9, 9, 10] and sum(shares) == 64
    assert [s.iteration for s in Schedule.parse("every:7").resolved(400).stops] == [57, 114, 171, 228, 285, 342]
    assert Schedule.parse("every:4").scaled(100) == Schedule.parse("every:4")
    # Per trajectory, a uniform v-way split costs about (v + 1) / (2 v) of dense (before attention's
    # quadratic term and the class token); per image, v times less.
    bound = speedup_bound(schedule, 4000, 196, 1, 192)
    assert 1.55 < bound < 1.75 and 6.2 < 4 * bound < 7.0


@pytest.mark.parametrize("text, message", [
    ("every:1", "V >= 2"), ("every:x", "V >= 2"), ("every:", "V >= 2"), ("every:-3", "V >= 2"),
])
def test_bad_every_schedules_are_one_line_errors(text, message):
    with pytest.raises(SmiError, match=message):
        Schedule.parse(text)


def test_every_v_needs_v_iterations_and_v_patches():
    with pytest.raises(SmiError, match="needs at least 8 iterations"):
        Schedule.parse("every:8").validate(7, 64)
    with pytest.raises(SmiError, match="use V <= 4"):
        Schedule.parse("every:5").validate(100, 4)
    Schedule.parse("every:8").validate(8, 64)


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
