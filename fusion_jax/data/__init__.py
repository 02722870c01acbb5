"""Data: task algebra, TFDS tables, per-seed splits and device-side sampling."""
