"""``pyfarm.jobtypes.core``: the job type base class and its helpers."""
