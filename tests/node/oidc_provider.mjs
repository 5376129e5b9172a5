// A real OpenID Connect provider on loopback for Bastion's tests: node-oidc-provider (panva) 9.x.
//
//   node tests/node/oidc_provider.mjs --port 0 [--access-token-alg RS256|ES256] [--exit-with-stdin]
//
// Listens on 127.0.0.1 only, at issuer http://127.0.0.1:PORT, and prints exactly one JSON line on
// stdout once it accepts connections: {"issuer": "...", "port": N}. Everything else goes to stderr.
// SIGTERM / SIGINT close the server and exit 0; with --exit-with-stdin it also exits when its
// standard input closes, so a test runner that dies cannot leave it behind.
//
// What it serves:
//   - signing keys made at start (RS256 and ES256, never written anywhere), published at jwks_uri;
//     discovery at /.well-known/openid-configuration;
//   - RFC 8707 resource indicators: any http://127.0.0.1:<port>/... resource is accepted; the access
//     token for it is a JWT (typ at+jwt) whose aud is that resource, lives 300 s, and carries the
//     user's `tenant` and `roles` as extra claims;
//   - fixed users alice, bob, carol (see USERS), each with the password `<user>-password`;
//   - a public client `bastion-tests` (no secret, PKCE S256 required) with redirect URI
//     http://127.0.0.1/callback.
// Users log in through this file's own interaction pages at /interaction/<uid> (the pattern the
// oidc-provider docs prescribe; its devInteractions accept any login and then fail with a server
// error on an unknown account): a login form (fields prompt=login, login, password) and a consent
// form (prompt=consent). A wrong user or password ends the flow with error=access_denied at the
// redirect URI.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import Provider, { errors } from 'oidc-provider';

const USERS = {
  alice: { tenant: 'acme', roles: ['member'], name: 'Alice Example', email: 'alice@acme.test' },
  bob: { tenant: 'globex', roles: ['member'], name: 'Bob Example', email: 'bob@globex.test' },
  carol: { tenant: 'acme', roles: ['admin'], name: 'Carol Example', email: 'carol@acme.test' },
};
const passwordOf = (user) => `${user}-password`;

const CLIENT_ID = 'bastion-tests';
const REDIRECT_URI = 'http://127.0.0.1/callback';
// Scopes a resource server (an MCP endpoint) knows; requested scopes outside them are dropped.
const RESOURCE_SCOPES = 'mcp:read mcp:write mcp:admin';
const ACCESS_TOKEN_TTL = 300;

// stdout carries the ready line only: oidc-provider prints its notices with console.info.
console.log = console.error;
console.info = console.error;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'access-token-alg': { type: 'string', default: 'RS256' },
    'exit-with-stdin': { type: 'boolean', default: false },
  },
});

const port = Number(args.port);
if (!Number.isInteger(port) || port < 0 || port > 65535) {
  console.error(`--port must be an integer in 0..65535, got ${args.port}`);
  process.exit(2);
}
const accessTokenAlg = args['access-token-alg'];
if (!['RS256', 'ES256'].includes(accessTokenAlg)) {
  console.error(`--access-token-alg must be RS256 or ES256, got ${accessTokenAlg}`);
  process.exit(2);
}

function signingJwk(alg) {
  const { privateKey } = alg === 'RS256'
    ? crypto.generateKeyPairSync('rsa', { modulusLength: 2048 })
    : crypto.generateKeyPairSync('ec', { namedCurve: 'P-256' });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, alg, use: 'sig', kid: `${alg.toLowerCase()}-${crypto.randomBytes(6).toString('hex')}` };
}

// True for http://127.0.0.1:<port>/... (an explicit port, no credentials, no fragment).
function isLoopbackResource(resource) {
  const url = URL.parse(resource);
  return Boolean(url)
    && url.protocol === 'http:'
    && url.hostname === '127.0.0.1'
    && url.port !== ''
    && url.username === ''
    && url.password === ''
    && url.hash === '';
}

function account(id) {
  const user = Object.hasOwn(USERS, id) ? USERS[id] : undefined;
  if (!user) return undefined;
  return {
    accountId: id,
    async claims() {
      // Filtered by oidc-provider against the granted scopes and `claims` below.
      return {
        sub: id,
        name: user.name,
        email: user.email,
        email_verified: true,
        tenant: user.tenant,
        roles: [...user.roles],
      };
    },
  };
}

const server = http.createServer();
server.listen(port, '127.0.0.1');
await new Promise((resolve, reject) => {
  server.once('listening', resolve);
  server.once('error', reject);
});
const actualPort = server.address().port;
const issuer = `http://127.0.0.1:${actualPort}`;

const provider = new Provider(issuer, {
  jwks: { keys: [signingJwk('RS256'), signingJwk('ES256')] },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  clients: [
    {
      client_id: CLIENT_ID,
      client_name: 'Bastion test suite',
      application_type: 'web',
      token_endpoint_auth_method: 'none',
      redirect_uris: [REDIRECT_URI],
      grant_types: ['authorization_code', 'refresh_token'],
      response_types: ['code'],
    },
  ],
  claims: {
    openid: ['sub'],
    profile: ['name', 'tenant', 'roles'],
    email: ['email', 'email_verified'],
  },
  scopes: ['openid', 'offline_access', 'profile', 'email'],
  responseTypes: ['code'],
  async findAccount(ctx, sub) {
    return account(sub);
  },
  async extraTokenClaims(ctx, token) {
    if (token.kind !== 'AccessToken' || !token.accountId) return undefined;
    const user = USERS[token.accountId];
    if (!user) return undefined;
    return { tenant: user.tenant, roles: [...user.roles] };
  },
  pkce: { required: () => true },
  interactions: {
    url: (ctx, interaction) => `/interaction/${interaction.uid}`,
  },
  features: {
    devInteractions: { enabled: false },
    resourceIndicators: {
      enabled: true,
      // A single requested resource is the default at the token endpoint too.
      defaultResource: async (ctx, client, oneOf) => oneOf,
      useGrantedResource: async () => true,
      async getResourceServerInfo(ctx, resource) {
        if (!isLoopbackResource(resource)) {
          throw new errors.InvalidTarget('only http://127.0.0.1:<port>/... resources are served');
        }
        return {
          scope: RESOURCE_SCOPES,
          audience: resource,
          accessTokenTTL: ACCESS_TOKEN_TTL,
          accessTokenFormat: 'jwt',
          jwt: { sign: { alg: accessTokenAlg } },
        };
      },
    },
  },
  ttl: {
    AccessToken: ACCESS_TOKEN_TTL,
    AuthorizationCode: 60,
    IdToken: 300,
    Interaction: 600,
    Session: 3600,
    Grant: 3600,
    RefreshToken: 3600,
  },
  // Logged, never shown to the test client in detail beyond the standard error body.
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
});

provider.on('server_error', (ctx, err) => console.error('oidc-provider server_error:', err));

// -- interactions: login and consent -------------------------------------------------------------

const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);

function page(res, title, form) {
  const body = `<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>
<body><h1>${escapeHtml(title)}</h1>
${form}
</body></html>
`;
  res.writeHead(200, {
    'content-type': 'text/html; charset=utf-8',
    'cache-control': 'no-store',
    'content-length': Buffer.byteLength(body),
  });
  res.end(body);
}

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 16 * 1024) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

async function interaction(req, res, uid) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction uid mismatch');
  const { prompt, params, session } = details;
  const action = escapeHtml(`/interaction/${uid}`);

  if (req.method === 'GET') {
    if (prompt.name === 'login') {
      return page(res, 'Sign-in', `<form autocomplete="off" action="${action}" method="post">
  <input type="hidden" name="prompt" value="login"/>
  <input required type="text" name="login" placeholder="user" value="${escapeHtml(params.login_hint ?? '')}"/>
  <input required type="password" name="password" placeholder="password"/>
  <button type="submit">Sign-in</button>
</form>`);
    }
    if (prompt.name === 'consent') {
      return page(res, 'Authorize', `<p>${escapeHtml(params.client_id)} asks for ${escapeHtml(params.scope ?? '')}</p>
<form autocomplete="off" action="${action}" method="post">
  <input type="hidden" name="prompt" value="consent"/>
  <button type="submit">Continue</button>
</form>`);
    }
    throw new Error(`unsupported prompt ${prompt.name}`);
  }

  const form = await readForm(req);
  if (form.get('prompt') !== prompt.name) throw new Error('submitted prompt does not match');

  if (prompt.name === 'login') {
    const login = form.get('login') ?? '';
    if (!Object.hasOwn(USERS, login) || form.get('password') !== passwordOf(login)) {
      return provider.interactionFinished(req, res, {
        error: 'access_denied',
        error_description: 'invalid user or password',
      }, { mergeWithLastSubmission: false });
    }
    return provider.interactionFinished(req, res, {
      login: { accountId: login, amr: ['pwd'] },
    }, { mergeWithLastSubmission: false });
  }

  // consent: grant what the authorization request asked for and has not been granted yet.
  const { details: missing } = prompt;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId: session.accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  if (missing.missingResourceScopes) {
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes)) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
  }
  const grantId = await grant.save();
  return provider.interactionFinished(req, res, { consent: { grantId } }, {
    mergeWithLastSubmission: true,
  });
}

const oidcCallback = provider.callback();
const INTERACTION = /^\/interaction\/([A-Za-z0-9_-]+)$/;

server.on('request', (req, res) => {
  const match = INTERACTION.exec(new URL(req.url, issuer).pathname);
  if (!match || !['GET', 'POST'].includes(req.method)) {
    oidcCallback(req, res);
    return;
  }
  interaction(req, res, match[1]).catch((err) => {
    console.error('interaction error:', err);
    if (!res.headersSent) {
      res.writeHead(400, { 'content-type': 'text/plain; charset=utf-8' });
    }
    res.end(`interaction failed: ${err.message}\n`);
  });
});

let stopping = false;
function stop(code = 0) {
  if (stopping) return;
  stopping = true;
  server.close(() => process.exit(code));
  server.closeAllConnections();
  setTimeout(() => process.exit(code), 2000).unref();
}
process.on('SIGTERM', () => stop(0));
process.on('SIGINT', () => stop(0));
if (args['exit-with-stdin']) {
  process.stdin.on('end', () => stop(0));
  process.stdin.on('error', () => stop(0));
  process.stdin.resume();
}

process.stdout.write(`${JSON.stringify({ issuer, port: actualPort })}\n`);
