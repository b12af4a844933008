"""tools/budget.py: what counts as training outside the budget."""

from tools.budget import allowance_seconds, over_budget


def accounting(steps=200, untimed=2, batch=16384):
    return {"num_steps": steps, "untimed_steps": untimed, "total_batch_size": batch,
            "untimed_tokens": untimed * batch, "timed_tokens": (steps - untimed) * batch,
            "total_tokens_M": steps * batch / 1e6}


def test_the_allowance_is_a_minute_plus_a_fifth_of_the_budget():
    assert allowance_seconds(300) == 120 and allowance_seconds(10) == 62


def test_a_standard_run_with_a_cold_compile_is_inside():
    assert over_budget(accounting(), 300 + 75, 300) is None


def test_wall_time_past_the_allowance_is_over_budget_whatever_the_script_says():
    assert over_budget(accounting(), 421, 300) == "over budget: 421 s wall for a 300 s budget, at most 420 s"


def test_more_untimed_steps_than_two_or_five_percent_is_over_budget():
    assert over_budget(accounting(steps=200, untimed=10), 330, 300) is None  # 5% of 200 steps
    reason = over_budget(accounting(steps=200, untimed=11), 330, 300)
    assert reason.startswith("over budget: untimed steps trained 180,224 of 3,276,800 tokens (6%")
    assert over_budget(accounting(steps=6, untimed=2), 30, 10) is None  # two steps are always free


def test_token_accounting_that_does_not_add_up_or_is_missing_is_over_budget():
    fields = accounting()
    fields["total_tokens_M"] = 1.0
    assert "tokens do not add up" in over_budget(fields, 330, 300)
    fields = accounting()
    del fields["untimed_tokens"]
    assert "reports no untimed_tokens" in over_budget(fields, 330, 300)
