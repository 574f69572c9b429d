"""Seeding, distributed helpers, run metadata."""
from kdprune.utils.seed import seed_everything
from kdprune.utils.dist import DistInfo, dist_info, is_main_process

__all__ = ["seed_everything", "DistInfo", "dist_info", "is_main_process"]
