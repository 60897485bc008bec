"""Small shared utilities (atomic I/O, seeding, environment records)."""
