"""Upstream logins beyond a configured password: OAuth2 token sources per provider, the
encrypted token store, consent, and the app passwords owners gave on the connect page (sealed
like the tokens).

Importing this package loads no OAuth library: msal and google-auth are imported by the
provider modules only when an account uses them.
"""
