// Drives the official MCP server (@wavespeed/mcp) over stdio, as an MCP host would.
// node mcp_scenario.mjs '<json list of [tool, args]>'; the server gets WAVESPEED_BASE_URL,
// WAVESPEED_API_KEY and HOME from this process's environment. Prints one JSON line: a list
// of {tool, isError, text}.
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { createRequire } from 'node:module';
import path from 'node:path';

const require = createRequire(import.meta.url);
const pkg = path.dirname(require.resolve('@wavespeed/mcp/package.json'));
const transport = new StdioClientTransport({
  command: process.execPath, args: [path.join(pkg, 'dist/index.js')],
  env: { ...process.env }, stderr: 'ignore',
});
const client = new Client({ name: 'wan-tasks-tests', version: '0' });
await client.connect(transport);
const out = [];
for (const [tool, args] of JSON.parse(process.argv[2])) {
  try {
    const r = await client.callTool({ name: tool, arguments: args });
    out.push({ tool, isError: Boolean(r.isError), text: r.content.map((c) => c.text).join('') });
  } catch (e) {
    out.push({ tool, isError: true, text: `THROW ${e.message}` });
  }
}
await client.close();
process.stdout.write(JSON.stringify(out) + '\n');
