"""The planner's parts, one rule (or one shared concern) per module; ``reconciler.planner`` applies them in order.

From the top: ``scope`` (which history entries a plan walks: first sight, backfill, a new uid, a history restart,
the regular tick), then the rules ``history`` (rule 3), ``operations`` (rules 4 and 5) and ``image_change``
(rule 6), then ``draft`` (the plan being built and the snapshot invariants every rule keeps), and at the bottom
``health`` (the health verdict of a history entry) and ``live_images`` (``status.summary.images`` read per image
repository). Every module is pure: no I/O, no clock. A new rule is a new module here, called by ``plan()`` at
its place in the order: it reads the ``Draft`` (the observation, the input snapshot, the steps emitted so far
with their results and reasons) and adds steps, or facts recorded in the snapshot.
"""
