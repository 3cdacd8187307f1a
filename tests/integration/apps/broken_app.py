"""An application that fails while it is imported, as a missing setting or a typo would make it."""

raise RuntimeError("DATABASE_URL is not set\nsecond line that the one-line summary leaves out")
