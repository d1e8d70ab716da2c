"""``pyfarm.jobtypes``: the code that executes a task (here: inside the task's scope)."""
