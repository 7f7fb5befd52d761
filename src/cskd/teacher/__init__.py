"""The teacher-response cache: its format on disk (store) and the teacher that reads it (cached)."""
