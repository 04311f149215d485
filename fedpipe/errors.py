"""The base of every error fedpipe reports to a user.

Programs catch `FedpipeError` once and print its message (exit status 2);
anything else is a bug and keeps its traceback. Each subclass names the
object at fault and the fix in its message, and usually also derives from
the built-in a caller would expect (`ValueError` for a bad value,
`PermissionError` for a refusal), so `except ValueError` keeps working.
"""


class FedpipeError(Exception):
  """An error whose message tells the user what is wrong and what to do."""
