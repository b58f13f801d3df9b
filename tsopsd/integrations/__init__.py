"""Integrations with RL frameworks, each imported only where it is used (`tsopsd.integrations.trl` needs `trl`)."""
