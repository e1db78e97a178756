"""Cron schedules read the way cron and a Kubernetes CronJob read them (``serve`` and config validation)."""

from __future__ import annotations

from datetime import UTC, tzinfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.combining import OrTrigger
from apscheduler.triggers.cron import CronTrigger

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")


# -- the schedule --------------------------------------------------------------------------------------


def cron_trigger(expression: str, timezone: tzinfo = UTC) -> BaseTrigger:
    """A trigger for a standard five-field crontab expression, read the way cron (and a CronJob) reads it.

    APScheduler 3.x's ``CronTrigger.from_crontab`` differs from cron twice: it numbers weekdays from
    0 = Monday (cron: 0 or 7 = Sunday), so ``0 9 * * 1-5`` would run Tuesday to Saturday; and it requires
    both day fields to match, where cron runs when either does if both are restricted (``0 0 1 * 1``:
    the 1st of each month and every Monday). Weekdays are translated to names here and the two day
    fields become an ``OrTrigger`` when both are restricted. Raises ``ValueError`` with the reason.
    """
    fields = expression.split()
    if len(fields) != 5:
        raise ValueError(f"a cron schedule has 5 fields (minute hour day month weekday), got {expression!r}")
    minute, hour, day, month, weekday = fields
    weekdays = _weekday_names(weekday)

    def build(day_of_month: str, day_of_week: str) -> CronTrigger:
        return CronTrigger(
            minute=minute, hour=hour, day=day_of_month, month=month, day_of_week=day_of_week, timezone=timezone
        )

    try:
        if not day.startswith("*") and not weekday.startswith("*"):
            return OrTrigger([build(day, "*"), build("*", weekdays)])
        return build(day, weekdays)
    except ValueError as error:
        raise ValueError(f"invalid cron schedule {expression!r}: {error}") from None


def _weekday_names(field: str) -> str:
    """Cron's weekday field (numbers 0-7 with 0 and 7 Sunday, or names; lists, ranges, steps) as names."""
    if field == "*":
        return "*"
    days: set[int] = set()
    for part in field.split(","):
        span, _, step_text = part.partition("/")
        step = _number(step_text, "step") if step_text else 1
        if step < 1:
            raise ValueError(f"weekday step must be at least 1 in {field!r}")
        if span == "*":
            first, last = 0, 6
        elif "-" in span:
            start, _, end = span.partition("-")
            first, last = _weekday(start, field), _weekday(end, field)
            if first > last:
                raise ValueError(f"weekday range {span!r} runs backwards in {field!r}")
        else:
            first = _weekday(span, field)
            last = 6 if step_text else first
        days.update(day % 7 for day in range(first, last + 1, step))
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


def _weekday(text: str, field: str) -> int:
    lowered = text.lower()
    if lowered in _WEEKDAYS:
        return _WEEKDAYS.index(lowered)
    value = _number(text, "weekday")
    if not 0 <= value <= 7:
        raise ValueError(f"weekday {text!r} is not 0-7 or sun-sat in {field!r}")
    return value


def _number(text: str, what: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} {text!r} is not a number")
    return int(text)
