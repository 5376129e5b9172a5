// A real OpenID Connect provider on loopback for Bastion's tests: node-oidc-provider (panva) 9.x.
//
//   node tests/node/oidc_provider.mjs --port 0 [--access-token-alg RS256|ES256] [--exit-with-stdin]
//        [--trust-issuer URL ...] [--exchange-secret=S]
//
// (Write --exchange-secret=S with `=` when S may start with "-": parseArgs refuses such a value
// given as a separate argument.)
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
//   - with --exchange-secret S, a confidential client `bastion-gateway` (client_secret S, Basic or
//     post authentication) allowed the RFC 8693 token-exchange grant (see TOKEN EXCHANGE below);
//     --trust-issuer URL (repeatable) names an issuer whose subject tokens that grant accepts.
// Users log in through this file's own interaction pages at /interaction/<uid> (the pattern the
// oidc-provider docs prescribe; its devInteractions accept any login and then fail with a server
// error on an unknown account): a login form (fields prompt=login, login, password) and a consent
// form (prompt=consent). A wrong user or password ends the flow with error=access_denied at the
// redirect URI.
//
// TOKEN EXCHANGE (RFC 8693), the request the grant accepts:
//
//   POST /token   Authorization: Basic base64(bastion-gateway:S)   (or client_id + client_secret
//                 in the form)   Content-Type: application/x-www-form-urlencoded
//     grant_type=urn:ietf:params:oauth:grant-type:token-exchange
//     subject_token=<JWT>                                   required
//     subject_token_type=urn:ietf:params:oauth:token-type:jwt  required, exactly this
//     audience=http://127.0.0.1:<port>/...                  audience and/or resource; equal if both
//     resource=http://127.0.0.1:<port>/...
//     scope=...                                             optional, copied into the token
//     requested_token_type=urn:ietf:params:oauth:token-type:access_token   optional
//   (actor_token is refused; every parameter at most once.)
//
// The subject token must be a JWS signed by a key of a trusted issuer's JWKS at
// <issuer>/.well-known/jwks.json (fetched on first use, cached, fetched again on an unknown kid),
// alg ES256, EdDSA or RS256; `iss` exactly that issuer; `aud` this provider's issuer or its token
// endpoint; `exp` in the future (5 s leeway) and at most 60 s away (exp - iat <= 60 when iat is
// present); string claims `sub` and `tenant`; `act`, if present, an object with a string `sub`.
// Otherwise: 400 invalid_grant with an error_description saying which check failed. A target that
// is not http://127.0.0.1:<port>/...: 400 invalid_target. A wrong client secret: 401 invalid_client.
//
// Answer: {"access_token", "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
// "token_type": "Bearer", "expires_in": 120[, "scope"]}; the access token is a JWT (typ at+jwt,
// signed with this provider's --access-token-alg key from jwks_uri) with iss, aud = the target,
// sub, act (copied when present), tenant, client_id = bastion-gateway, scope (when requested), iat,
// exp = iat + 120, jti.

import * as crypto from 'node:crypto';
import * as http from 'node:http';
import { parseArgs } from 'node:util';

import * as jose from 'jose';
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

const EXCHANGE_CLIENT_ID = 'bastion-gateway';
const TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TOKEN_TYPE_JWT = 'urn:ietf:params:oauth:token-type:jwt';
const TOKEN_TYPE_ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const EXCHANGED_TOKEN_TTL = 120;
const SUBJECT_MAX_LIFETIME = 60;
const SUBJECT_CLOCK_LEEWAY = 5;
const SUBJECT_ALGS = ['ES256', 'EdDSA', 'RS256'];
const JWKS_FETCH_TIMEOUT_MS = 3000;

// stdout carries the ready line only: oidc-provider prints its notices with console.info.
console.log = console.error;
console.info = console.error;

const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: '0' },
    'access-token-alg': { type: 'string', default: 'RS256' },
    'exit-with-stdin': { type: 'boolean', default: false },
    'trust-issuer': { type: 'string', multiple: true, default: [] },
    'exchange-secret': { type: 'string' },
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

const trustIssuers = args['trust-issuer'];
for (const trusted of trustIssuers) {
  const url = URL.parse(trusted);
  if (!url || !['http:', 'https:'].includes(url.protocol) || url.username || url.password
      || url.search || url.hash) {
    console.error(`--trust-issuer must be an http(s) URL without query or fragment, got ${trusted}`);
    process.exit(2);
  }
}
const exchangeSecret = args['exchange-secret'];
if (exchangeSecret !== undefined && exchangeSecret.length < 16) {
  console.error('--exchange-secret must be at least 16 characters');
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

const signingKeys = [signingJwk('RS256'), signingJwk('ES256')];
// The key that signs exchanged tokens: the one access tokens use, hence published at jwks_uri.
const exchangeJwk = signingKeys.find((jwk) => jwk.alg === accessTokenAlg);
const exchangeKey = await jose.importJWK(exchangeJwk, accessTokenAlg);

const clients = [
  {
    client_id: CLIENT_ID,
    client_name: 'Bastion test suite',
    application_type: 'web',
    token_endpoint_auth_method: 'none',
    redirect_uris: [REDIRECT_URI],
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
  },
  {
    // The console's login (tests/test_console.py): a native client, so its loopback redirect
    // URI matches whatever port the gateway under test listens on (RFC 8252 section 7.3).
    client_id: 'bastion-console',
    client_name: 'Bastion console (tests)',
    application_type: 'native',
    token_endpoint_auth_method: 'none',
    redirect_uris: ['http://127.0.0.1/console/auth/callback'],
    grant_types: ['authorization_code'],
    response_types: ['code'],
  },
];
if (exchangeSecret !== undefined) {
  clients.push({
    client_id: EXCHANGE_CLIENT_ID,
    client_secret: exchangeSecret,
    client_name: 'Bastion gateway (token exchange)',
    application_type: 'web',
    // client_secret_post is accepted as well: oidc-provider treats the two as one method.
    token_endpoint_auth_method: 'client_secret_basic',
    redirect_uris: [],
    grant_types: [TOKEN_EXCHANGE],
    response_types: [],
  });
}

const provider = new Provider(issuer, {
  jwks: { keys: signingKeys.map((jwk) => structuredClone(jwk)) },
  cookies: { keys: [crypto.randomBytes(32).toString('base64url')] },
  clients,
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
provider.on('grant.error', (ctx, err) => {
  console.error(`token endpoint: ${ctx.oidc?.params?.grant_type}: ${err.error ?? err.message}: `
    + `${err.error_description ?? ''}`);
});

// -- token exchange (RFC 8693) -----------------------------------------------------------------

const tokenEndpoint = provider.urlFor('token');

// One lazily fetched JWKS per trusted issuer: nothing is fetched before the first exchange (the
// issuer may start after this provider); the set is cached and fetched again when a token names
// a kid it does not hold (no cooldown: loopback, and a rotated key must work at once).
const trustedIssuers = new Map(trustIssuers.map((trusted) => {
  const jwksUrl = new URL('.well-known/jwks.json', trusted.endsWith('/') ? trusted : `${trusted}/`);
  const remote = jose.createRemoteJWKSet(jwksUrl, {
    timeoutDuration: JWKS_FETCH_TIMEOUT_MS,
    cooldownDuration: 0,
  });
  return [trusted, { jwksUrl: jwksUrl.href, remote }];
}));

const invalidGrant = (description) => new errors.CustomOIDCProviderError('invalid_grant', description);

class KeysUnavailable extends Error {}

const isPlainObject = (value) => typeof value === 'object' && value !== null && !Array.isArray(value);
const isNonEmptyString = (value) => typeof value === 'string' && value.length > 0;

function describeSubjectError(err, trusted, header) {
  const { jwksUrl } = trustedIssuers.get(trusted);
  const kid = JSON.stringify(header.kid ?? null);
  if (err instanceof KeysUnavailable) return err.message;
  if (err instanceof jose.errors.JWKSNoMatchingKey) {
    return `no key of trusted issuer ${trusted} (${jwksUrl}) matches the subject_token header `
      + `(kid ${kid}, alg ${header.alg})`;
  }
  if (err instanceof jose.errors.JWKSMultipleMatchingKeys) {
    return `several keys of ${jwksUrl} match the subject_token header (kid ${kid}); name one kid`;
  }
  if (err instanceof jose.errors.JWSSignatureVerificationFailed) {
    return `subject_token signature does not verify with key ${kid} of ${jwksUrl}`;
  }
  if (err instanceof jose.errors.JWTExpired) {
    return `subject_token expired (exp ${err.payload?.exp}, now ${Math.floor(Date.now() / 1000)}, `
      + `leeway ${SUBJECT_CLOCK_LEEWAY} s)`;
  }
  if (err instanceof jose.errors.JWTClaimValidationFailed) {
    if (err.claim === 'aud') {
      return `subject_token aud ${JSON.stringify(err.payload?.aud ?? null)} is neither this `
        + `provider's issuer ${issuer} nor its token endpoint ${tokenEndpoint}`;
    }
    return `subject_token ${err.claim} claim rejected: ${err.message}`;
  }
  if (err instanceof jose.errors.JOSEAlgNotAllowed) {
    return `subject_token alg ${header.alg} is not accepted (${SUBJECT_ALGS.join(', ')})`;
  }
  if (err instanceof jose.errors.JOSEError) {
    return `subject_token rejected: ${err.message}`;
  }
  console.error('token exchange: unexpected error while verifying a subject token:', err);
  return `subject_token rejected: ${err.message}`;
}

// The verified claims of a subject token, or invalid_grant saying which check failed.
async function verifySubjectToken(token) {
  let header;
  let unverified;
  try {
    header = jose.decodeProtectedHeader(token);
    unverified = jose.decodeJwt(token);
  } catch {
    throw invalidGrant('subject_token is not a JWT (a compact JWS with a JSON claims set)');
  }
  const trusted = unverified.iss;
  if (typeof trusted !== 'string' || !trustedIssuers.has(trusted)) {
    throw invalidGrant(`subject_token iss ${JSON.stringify(trusted ?? null)} is not a trusted issuer`
      + ` (trusted: ${[...trustedIssuers.keys()].join(', ') || 'none'})`);
  }
  if (!SUBJECT_ALGS.includes(header.alg)) {
    throw invalidGrant(`subject_token alg ${JSON.stringify(header.alg ?? null)} is not accepted `
      + `(${SUBJECT_ALGS.join(', ')})`);
  }
  const { jwksUrl, remote } = trustedIssuers.get(trusted);
  const keyFor = async (protectedHeader, jws) => {
    try {
      return await remote(protectedHeader, jws);
    } catch (err) {
      if (err instanceof jose.errors.JWKSNoMatchingKey
          || err instanceof jose.errors.JWKSMultipleMatchingKeys) {
        throw err;
      }
      const cause = err.cause?.code ?? err.cause?.message;
      throw new KeysUnavailable(`cannot get the keys of trusted issuer ${trusted} from ${jwksUrl}: `
        + `${err.message}${cause ? ` (${cause})` : ''}`);
    }
  };
  let payload;
  try {
    ({ payload } = await jose.jwtVerify(token, keyFor, {
      issuer: trusted,
      audience: [issuer, tokenEndpoint],
      algorithms: SUBJECT_ALGS,
      clockTolerance: SUBJECT_CLOCK_LEEWAY,
      requiredClaims: ['exp', 'sub', 'tenant'],
    }));
  } catch (err) {
    throw invalidGrant(describeSubjectError(err, trusted, header));
  }
  const now = Math.floor(Date.now() / 1000);
  if (payload.exp - now > SUBJECT_MAX_LIFETIME + SUBJECT_CLOCK_LEEWAY) {
    throw invalidGrant(`subject_token exp is ${payload.exp - now} s away; at most `
      + `${SUBJECT_MAX_LIFETIME} s is accepted`);
  }
  if (payload.iat !== undefined) {
    if (payload.iat > now + SUBJECT_CLOCK_LEEWAY) {
      throw invalidGrant(`subject_token iat ${payload.iat} is in the future (now ${now})`);
    }
    if (payload.exp - payload.iat > SUBJECT_MAX_LIFETIME) {
      throw invalidGrant(`subject_token lives ${payload.exp - payload.iat} s (exp - iat); at most `
        + `${SUBJECT_MAX_LIFETIME} s is accepted`);
    }
  }
  if (!isNonEmptyString(payload.sub)) {
    throw invalidGrant('subject_token sub must be a non-empty string');
  }
  if (!isNonEmptyString(payload.tenant)) {
    throw invalidGrant('subject_token tenant must be a non-empty string');
  }
  if (payload.act !== undefined && !(isPlainObject(payload.act) && isNonEmptyString(payload.act.sub))) {
    throw invalidGrant('subject_token act must be an object with a string sub');
  }
  return payload;
}

// The single target of the exchange: `audience` and/or `resource` (equal when both are sent).
function exchangeTarget(params) {
  const { audience, resource } = params;
  if (audience === undefined && resource === undefined) {
    throw new errors.InvalidRequest("missing required parameter 'audience' (or 'resource')");
  }
  if (audience !== undefined && resource !== undefined && audience !== resource) {
    throw new errors.InvalidTarget('audience and resource name different targets; send one target');
  }
  const target = audience ?? resource;
  if (!isLoopbackResource(target)) {
    throw new errors.InvalidTarget(`target ${JSON.stringify(target)} is not an `
      + 'http://127.0.0.1:<port>/... URL');
  }
  return target;
}

async function tokenExchange(ctx) {
  const { params, client } = ctx.oidc;
  if (!params.subject_token) {
    throw new errors.InvalidRequest("missing required parameter 'subject_token'");
  }
  if (params.subject_token_type !== TOKEN_TYPE_JWT) {
    throw new errors.InvalidRequest(`subject_token_type must be ${TOKEN_TYPE_JWT}`);
  }
  if (params.actor_token !== undefined || params.actor_token_type !== undefined) {
    throw new errors.InvalidRequest('actor_token is not supported; put the actor in the subject '
      + 'token\'s act claim');
  }
  if (params.requested_token_type !== undefined
      && params.requested_token_type !== TOKEN_TYPE_ACCESS_TOKEN) {
    throw new errors.InvalidRequest(`requested_token_type must be ${TOKEN_TYPE_ACCESS_TOKEN}`);
  }
  const audience = exchangeTarget(params);
  const subject = await verifySubjectToken(params.subject_token);

  const iat = Math.floor(Date.now() / 1000);
  const scope = params.scope ? params.scope.split(' ').filter(Boolean).join(' ') : undefined;
  const claims = {
    iss: issuer,
    aud: audience,
    sub: subject.sub,
    ...(subject.act !== undefined ? { act: subject.act } : undefined),
    tenant: subject.tenant,
    client_id: client.clientId,
    ...(scope ? { scope } : undefined),
    iat,
    exp: iat + EXCHANGED_TOKEN_TTL,
    jti: crypto.randomBytes(16).toString('base64url'),
  };
  const accessToken = await new jose.SignJWT(claims)
    .setProtectedHeader({ alg: accessTokenAlg, kid: exchangeJwk.kid, typ: 'at+jwt' })
    .sign(exchangeKey);
  console.error(`token exchange: issued for sub ${subject.sub} (tenant ${subject.tenant}) `
    + `to ${audience}`);
  ctx.body = {
    access_token: accessToken,
    issued_token_type: TOKEN_TYPE_ACCESS_TOKEN,
    token_type: 'Bearer',
    expires_in: EXCHANGED_TOKEN_TTL,
    ...(scope ? { scope } : undefined),
  };
}

provider.registerGrantType(TOKEN_EXCHANGE, tokenExchange, [
  'subject_token', 'subject_token_type', 'actor_token', 'actor_token_type',
  'requested_token_type', 'audience', 'resource', 'scope',
]);

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
