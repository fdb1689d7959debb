"""archiver part of ctrserve (see README)."""
