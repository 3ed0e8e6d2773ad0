"""Policy stores: the PolicyStore interface and its backends."""
