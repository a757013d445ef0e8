"""Fake `modules_forge`: the main-thread runner and checkpoint_change (main_entry)."""
