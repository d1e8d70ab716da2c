"""``pyfarm.agent``: the agent-side names PyFarm job types import (config, logger)."""
