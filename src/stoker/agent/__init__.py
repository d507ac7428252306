"""The guest agent (stdlib only, Python 3.9+) and the files that ship it into guests."""
