"""Job files: a YAML list of jobs with dependencies, pre-processed with Jinja (JobControl's
way), run by the node itself when no master is configured, or submitted to the master."""
