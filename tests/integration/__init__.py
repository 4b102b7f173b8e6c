"""Integration tests: relayd as a real process between a client and the real mail world."""
