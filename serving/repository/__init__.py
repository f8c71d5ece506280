"""What is loaded: models (REPO/<model>/<version>/, each version's live parts, readiness), policy
(which versions serve), watcher (polling the folders).
"""
