// Drives the official JS SDK (`wavespeed` on npm) against the emulator, unchanged.
// node sdk_scenario.cjs <op> <arg> [sync]; WS_BASE = emulator URL, WAVESPEED_API_KEY = key.
// Prints one JSON line: the SDK's answer, or {"error": {name, message}}.
const wavespeed = require('wavespeed');
const MODEL = 'wavespeed-ai/wan-2.2/i2v-480p-lora-ultra-fast';
const [op, arg, mode] = process.argv.slice(2);
const base = process.env.WS_BASE;
const client = new wavespeed.Client(process.env.WAVESPEED_API_KEY, {
  baseUrl: base, maxConnectionRetries: 5, retryInterval: 0.05,
});
const opts = { pollInterval: 0.1, timeout: 120, enableSyncMode: mode === 'sync' };
const input = (image) => ({ image, prompt: 'a lake at dawn', duration: 5, seed: 7 });

const ops = {
  upload: async () => ({ url: await client.upload(arg) }),
  run: async () => client.run(MODEL, input(arg), opts),
  runNoThrow: async () => {
    const r = await client.runNoThrow(MODEL, input(arg), opts);
    const e = r.detail.error;
    return { outputs: r.outputs, status: r.detail.status, taskId: r.detail.taskId,
             error: e ? { name: e.name, message: e.message } : null };
  },
  topLevel: async () => {
    // The module-level functions use a default client built from the config on first use.
    require('wavespeed/dist/config').api.baseUrl = base;
    const url = await wavespeed.upload(arg);
    return { url, ...(await wavespeed.run(MODEL, input(url), { pollInterval: 0.1 })) };
  },
};

ops[op]()
  .then((out) => { process.stdout.write(JSON.stringify(out) + '\n'); })
  .catch((e) => {
    process.stdout.write(JSON.stringify({ error: { name: e.name, message: String(e.message) } }) + '\n');
  });
