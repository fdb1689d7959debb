"""trainer part of ctrserve (see README)."""
