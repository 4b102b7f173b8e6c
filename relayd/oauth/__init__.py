"""OAuth2 for upstream logins: token sources per provider, the encrypted token store, consent.

Importing this package loads no OAuth library: msal and google-auth are imported by the
provider modules only when an account uses them.
"""
