"""The planner's policies, one module each, as functions of a Draft (draft.py): no I/O, no clock; each
changes only the draft. planner.py decides which apply, in which order."""
