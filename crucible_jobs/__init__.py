from crucible_jobs.definitions import defs

__all__ = ["defs"]
