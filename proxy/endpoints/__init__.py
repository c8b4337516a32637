"""The endpoints, one module per route family; each takes a Request, returns a Response."""
