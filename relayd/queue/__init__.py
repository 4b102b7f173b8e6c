"""The queue manager (Postfix's qmgr): what is attempted when, through which lane."""
