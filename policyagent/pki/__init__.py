"""The server's PKI: CA, certificates, the identity database, authorization and secrets at rest.

- `ca`: the CA (created at first start), issuing host/admin/server certificates, roles in the EKU;
- `identity`: issued/revoked certificates, join tokens, enrolled computers (identity.sqlite3), `Revocations`;
- `authz`: `Peer`, `peer_of`, `require_admin`, `require_agent`, the `AuthzInterceptor`;
- `tls`: where clients find their certificates; `server`: `ServerPki`, everything opened at start;
- `secretbox`: AES-GCM sealing of pre-shared keys in the store.
"""
