"""handler part of ctrserve (see README)."""
