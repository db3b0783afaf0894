"""The difficulty-aware reward: every case, per group (paper) and per batch (official code)."""
import pytest

from relaykern.train.reward import (STUDENT_SOLVABLE, TEACHER_DEPENDENT, TEACHER_UNSOLVABLE, Sample, call_ratio,
                                    command_summary, difficulty_aware_rewards, difficulty_aware_rewards_batch,
                                    group_case)

RIGHT_ALONE = Sample(correct=True, called=False, call_ratio=0.0)
RIGHT_CALLED = Sample(correct=True, called=True, call_ratio=0.25)
WRONG_ALONE = Sample(correct=False, called=False, call_ratio=0.0)
WRONG_CALLED = Sample(correct=False, called=True, call_ratio=0.4)


def test_call_ratio_is_capped_and_safe():
    assert call_ratio(10, 40) == 0.25
    assert call_ratio(100, 40) == 1.0
    assert call_ratio(0, 40) == 0.0
    assert call_ratio(5, 0) == 0.0


def test_command_summary_sums_complete_commands_and_caps_n():
    assert command_summary("a <call>12</call> b <call> 3 </call>") == (True, 15)
    assert command_summary("no tags") == (False, 0)
    assert command_summary("<call>0</call> <call>x") == (False, 0)  # N = 0 and a malformed tag: no call
    for text in ("<call></call>", "<call>0</call>", "<call>x"):  # the official rule: any tag is a call
        assert command_summary(text, called_if="tag") == (True, 0)
    assert command_summary("<call>99999</call>", max_n=4096) == (True, 4096)
    assert command_summary("< call >5</call>") == (False, 0)  # not the strict grammar: plain text


def test_student_solvable_group():
    group = [RIGHT_ALONE, RIGHT_CALLED, WRONG_ALONE, WRONG_CALLED]
    assert group_case(group) == STUDENT_SOLVABLE
    assert difficulty_aware_rewards(group) == [1.5, 0.75, 0.0, 0.0]


def test_teacher_dependent_group():
    group = [RIGHT_CALLED, WRONG_ALONE, WRONG_CALLED]
    assert group_case(group) == TEACHER_DEPENDENT
    assert difficulty_aware_rewards(group) == [0.75, -1.0, 0.0]


def test_teacher_unsolvable_group_rewards_exploration():
    group = [WRONG_ALONE, WRONG_CALLED]
    assert group_case(group) == TEACHER_UNSOLVABLE
    assert difficulty_aware_rewards(group) == [0.0, pytest.approx(0.4)]


def test_group_mode_decides_each_group_alone():
    groups = [[RIGHT_ALONE, WRONG_CALLED], [RIGHT_CALLED, WRONG_ALONE], [WRONG_ALONE, WRONG_CALLED]]
    assert difficulty_aware_rewards_batch(groups, mode="group") == [[1.5, 0.0], [0.75, -1.0], [0.0, 0.4]]


def test_batch_mode_decides_once_for_all_groups_like_the_official_code():
    groups = [[RIGHT_ALONE, WRONG_CALLED], [RIGHT_CALLED, WRONG_ALONE], [WRONG_ALONE, WRONG_CALLED]]
    # One prompt solved without a call makes the whole batch student-solvable: no −1, no exploration bonus.
    assert difficulty_aware_rewards_batch(groups, mode="batch") == [[1.5, 0.0], [0.75, 0.0], [0.0, 0.0]]
    dependent = [[RIGHT_CALLED, WRONG_ALONE], [WRONG_ALONE, WRONG_CALLED]]
    assert difficulty_aware_rewards_batch(dependent, mode="batch") == [[0.75, -1.0], [-1.0, 0.0]]
    unsolved = [[WRONG_ALONE, WRONG_CALLED], [WRONG_CALLED]]
    assert difficulty_aware_rewards_batch(unsolved, mode="batch") == [[0.0, 0.4], [0.4]]


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="reward mode"):
        difficulty_aware_rewards_batch([[RIGHT_ALONE]], mode="prompt")
