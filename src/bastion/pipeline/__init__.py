"""The request path's stages, in the order a request meets them.

authn → session → route → authz → credentials → (upstream) → inspection → audit; `dispatch`
runs the MCP method once the stages before it have passed the exchange.
"""
