"""webui modules/errors.py: ``report`` prints and records instead of raising."""
import traceback

reported = []


def report(message, *, exc_info=False):
    reported.append(message if not exc_info else message + "\n" + traceback.format_exc())


def display(e, task, *, full_traceback=False):
    reported.append(f"{task}: {e}")
