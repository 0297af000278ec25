// The unmodified e2b JavaScript SDK (npm `e2b`) against agentbox's E2B facade.
//
// Run by tests/integration/e2b_js.rs with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY
// pointing at a test daemon's TCP listener that has the template `mini` (busybox: sh, no
// bash; default user `user`, uid 1000), and NODE_PATH naming the node_modules that holds
// the SDK. Each section creates its own sandboxes and kills them.
// `node sdk_test.mjs [SECTION...]` runs the named sections (default: all) and prints one
// line per check; any failure throws (non-zero exit).

import assert from 'node:assert/strict'
import { randomBytes } from 'node:crypto'
import { createRequire } from 'node:module'

// The SDK lives outside the source tree (a cache directory named by NODE_PATH): ES
// module imports do not read NODE_PATH, CommonJS require does, so load its CJS build.
const require = createRequire(import.meta.url)
const {
  AuthenticationError,
  CommandExitError,
  FileNotFoundError,
  FileType,
  FilesystemEventType,
  NotFoundError,
  Sandbox,
  SandboxError,
  TimeoutError,
} = require('e2b')

const TEMPLATE = 'mini'
const RUN = randomBytes(4).toString('hex')

function check(cond, what) {
  assert.ok(cond, what)
  console.log(`ok   ${what}`)
}

async function rejects(cls, fn, what) {
  let err
  try {
    await fn()
  } catch (e) {
    err = e
  }
  assert.ok(err !== undefined, `${what}: expected ${cls.name}, nothing thrown`)
  assert.ok(err instanceof cls, `${what}: expected ${cls.name}, got ${err?.name}: ${err?.message}`)
  console.log(`ok   ${what} (${err.name})`)
  return err
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms))

function create(opts = {}) {
  return Sandbox.create(TEMPLATE, { timeoutMs: 300_000, ...opts })
}

// (1) create, getInfo, isRunning, setTimeout, list with a metadata query, connect, kill
async function lifecycle() {
  const tag = `life-${RUN}`
  const t0 = Date.now()
  const sb = await create({ timeoutMs: 120_000, metadata: { suite: tag, role: 'main' }, envs: { GREETING: 'hello e2b' } })
  check(sb.sandboxId.length > 0, `create: id ${sb.sandboxId} in ${(Date.now() - t0) / 1000}s`)
  check(await sb.isRunning(), 'isRunning() of a new sandbox')
  const info = await sb.getInfo()
  check(info.sandboxId === sb.sandboxId && info.templateId === TEMPLATE, 'getInfo: id and template')
  assert.deepEqual(info.metadata, { suite: tag, role: 'main' })
  check(true, `getInfo: metadata ${JSON.stringify(info.metadata)}`)
  check(info.state === 'running', 'getInfo: state running')
  let life = (info.endAt - info.startedAt) / 1000
  check(life >= 115 && life <= 125, `getInfo: endAt - startedAt = ${life}s for timeoutMs=120000`)
  check(info.envdVersion === '0.5.7' && info.cpuCount >= 1 && info.memoryMB > 0, 'getInfo: envd version, cpus, memory')
  const r = await sb.commands.run('echo $GREETING')
  check(r.stdout === 'hello e2b\n', `envs of the sandbox reach commands: ${JSON.stringify(r.stdout)}`)

  await sb.setTimeout(600_000)
  life = ((await sb.getInfo()).endAt - info.startedAt) / 1000
  check(life >= 590 && life <= 620, `setTimeout(600000): endAt moved (${life}s)`)
  check((await Sandbox.getInfo(sb.sandboxId)).sandboxId === sb.sandboxId, 'Sandbox.getInfo(id)')

  const other = await create({ metadata: { suite: tag, role: 'other' } })
  const stranger = await create({ metadata: { suite: `other-${RUN}`, note: 'a b&c=d%' } })
  let found = await Sandbox.list({ query: { metadata: { suite: tag } } }).nextItems()
  check(
    found.map((s) => s.sandboxId).sort().join() === [sb.sandboxId, other.sandboxId].sort().join(),
    'Sandbox.list: metadata query',
  )
  found = await Sandbox.list({ query: { metadata: { suite: tag, role: 'other' } } }).nextItems()
  check(found.length === 1 && found[0].sandboxId === other.sandboxId, 'Sandbox.list: query on two metadata keys')
  check(found[0].state === 'running' && found[0].templateId === TEMPLATE, 'Sandbox.list: state and template')
  found = await Sandbox.list({ query: { metadata: { note: 'a b&c=d%', suite: `other-${RUN}` } } }).nextItems()
  check(found.length === 1 && found[0].sandboxId === stranger.sandboxId, "Sandbox.list: metadata values with ' &=%'")
  const pager = Sandbox.list({ query: { metadata: { suite: tag } }, limit: 1 })
  const pages = []
  while (pager.hasNext) pages.push((await pager.nextItems()).map((s) => s.sandboxId))
  check(pages.length === 2 && pages.every((p) => p.length === 1), `Sandbox.list: paging by 1 gives ${pages.length} pages`)
  found = await Sandbox.list({ query: { metadata: { suite: tag }, state: ['paused'] } }).nextItems()
  check(found.length === 0, 'Sandbox.list: state query (none paused)')

  const same = await Sandbox.connect(sb.sandboxId)
  check((await same.commands.run('echo again')).stdout === 'again\n', 'Sandbox.connect(id) to a running sandbox')

  check((await sb.kill()) === true, 'kill()')
  check((await sb.isRunning()) === false, 'isRunning() after kill')
  check((await Sandbox.kill(sb.sandboxId)) === false, 'Sandbox.kill(id) of a killed sandbox is false')
  await rejects(NotFoundError, () => Sandbox.getInfo(sb.sandboxId), 'getInfo of a killed sandbox')
  await rejects(SandboxError, () => sb.commands.run('true'), 'commands on a killed sandbox')
  await Sandbox.kill(other.sandboxId)
  await Sandbox.kill(stranger.sandboxId)

  await rejects(SandboxError, () => Sandbox.create(`no-such-template-${RUN}`), 'create from an unknown template')
  await rejects(
    AuthenticationError,
    () => Sandbox.create(TEMPLATE, { apiKey: 'e2b_' + '0'.repeat(40) }),
    'a wrong API key',
  )
}

// (2) commands: foreground with callbacks, exit codes, cwd/envs/user, background
async function commands() {
  const sb = await create()
  try {
    const out = []
    const err = []
    const stamps = []
    const t0 = Date.now()
    const r = await sb.commands.run('echo one; echo uno >&2; sleep 1; echo two', {
      onStdout: (s) => {
        out.push(s)
        stamps.push((Date.now() - t0) / 1000)
      },
      onStderr: (s) => err.push(s),
    })
    check(r.exitCode === 0 && r.stdout === 'one\ntwo\n' && r.stderr === 'uno\n', `run: result ${JSON.stringify(r)}`)
    check(out.join('') === 'one\ntwo\n' && err.join('') === 'uno\n', 'run: onStdout / onStderr')
    check(stamps[0] < 0.8 && stamps.at(-1) >= 0.9, `run: output streams as it comes (${stamps})`)

    const e = await rejects(CommandExitError, () => sb.commands.run('echo bad >&2; exit 3'), 'non-zero exit')
    check(e.exitCode === 3 && e.stderr === 'bad\n', `CommandExitError: code ${e.exitCode}, stderr ${JSON.stringify(e.stderr)}`)

    check((await sb.commands.run('pwd', { cwd: '/tmp' })).stdout === '/tmp\n', 'run: cwd')
    check((await sb.commands.run('pwd')).stdout === '/home/user\n', "run: default cwd is the user's home")
    check((await sb.commands.run('echo $A-$B', { envs: { A: '1', B: '2' } })).stdout === '1-2\n', 'run: envs')
    check((await sb.commands.run('id -u')).stdout === '1000\n', 'run: default user is `user`')
    check((await sb.commands.run('id -u', { user: 'root' })).stdout === '0\n', "run: user 'root'")

    let h = await sb.commands.run('echo start; sleep 0.5; echo end', { background: true })
    check(h.pid > 0, `background: pid ${h.pid}`)
    check((await h.wait()).stdout === 'start\nend\n', 'background: wait() collects the output')

    h = await sb.commands.run('sleep 30', { background: true })
    const procs = await sb.commands.list()
    check(procs.some((p) => p.pid === h.pid), 'commands.list() shows the background process')
    check((await h.kill()) === true, 'background: kill()')
    const k = await rejects(CommandExitError, () => h.wait(), 'wait() of a killed process')
    check(k.exitCode === -1, `killed process exit code ${k.exitCode}`)
    check((await sb.commands.list()).every((p) => p.pid !== h.pid), 'commands.list() after kill')
    check((await sb.commands.kill(999999)) === false, 'kill() of an unknown pid is false')

    h = await sb.commands.run('cat; echo EOF', { background: true, stdin: true })
    await sb.commands.sendStdin(h.pid, 'abc')
    await h.sendStdin('def')
    await h.closeStdin()
    check((await h.wait()).stdout === 'abcdefEOF\n', 'sendStdin / closeStdin')

    h = await sb.commands.run('sleep 1; echo done', { background: true })
    const again = await sb.commands.connect(h.pid)
    check((await again.wait()).stdout === 'done\n', 'commands.connect(pid)')
    await h.disconnect()

    await rejects(TimeoutError, () => sb.commands.run('sleep 20', { timeoutMs: 1000 }), 'run with timeoutMs 1000 of a longer command')
    await sleep(300)
    check((await sb.commands.list()).every((p) => !p.args.join(' ').includes('sleep 20')), 'the timed out command was killed')
  } finally {
    await sb.kill()
  }
}

// (3) files
async function files() {
  const sb = await create()
  try {
    const w = await sb.files.write('/tmp/hello.txt', 'hello world')
    check(w.path === '/tmp/hello.txt' && w.name === 'hello.txt' && w.type === FileType.FILE, `write: ${JSON.stringify(w)}`)
    check((await sb.files.read('/tmp/hello.txt')) === 'hello world', 'read text')
    const data = randomBytes(1 << 20)
    await sb.files.write('/tmp/bin', data.buffer.slice(data.byteOffset, data.byteOffset + data.length))
    const back = await sb.files.read('/tmp/bin', { format: 'bytes' })
    check(Buffer.from(back).equals(data), 'write and read 1 MiB of bytes')
    const blob = await sb.files.read('/tmp/bin', { format: 'blob' })
    check(Buffer.from(await blob.arrayBuffer()).equals(data), "read format 'blob'")
    const stream = await sb.files.read('/tmp/bin', { format: 'stream' })
    const chunks = []
    for await (const c of stream) chunks.push(Buffer.from(c))
    check(Buffer.concat(chunks).equals(data), "read format 'stream'")
    check((await sb.commands.run('cat /tmp/hello.txt')).stdout === 'hello world', 'written file seen by commands')

    await sb.files.write([
      { path: '/tmp/m/a.txt', data: 'A' },
      { path: '/tmp/m/sub/b.txt', data: 'B' },
    ])
    check((await sb.files.read('/tmp/m/sub/b.txt')) === 'B', 'write of several files (parents made)')
    await sb.files.write('rel.txt', 'relative')
    check((await sb.commands.run('cat /home/user/rel.txt')).stdout === 'relative', "relative paths are in the user's home")
    await sb.files.write('/root/secret', 's', { user: 'root' })
    check((await sb.files.read('/root/secret', { user: 'root' })) === 's', 'write and read as root')

    const entries = await sb.files.list('/tmp/m')
    check(
      JSON.stringify(entries.map((e) => [e.name, e.type]).sort()) === JSON.stringify([['a.txt', 'file'], ['sub', 'dir']]),
      'list',
    )
    const deep = await sb.files.list('/tmp/m', { depth: 2 })
    check(deep.map((e) => e.path).sort().join() === '/tmp/m/a.txt,/tmp/m/sub,/tmp/m/sub/b.txt', 'list depth 2')

    check((await sb.files.exists('/tmp/hello.txt')) && !(await sb.files.exists('/tmp/nope')), 'exists')
    check((await sb.files.makeDir('/tmp/d/e/f')) === true, 'makeDir (with parents)')
    check((await sb.files.makeDir('/tmp/d/e/f')) === false, 'makeDir of an existing directory is false')
    check((await sb.files.getInfo('/tmp/d/e/f')).type === FileType.DIR, 'made directory exists')

    const gi = await sb.files.getInfo('/tmp/hello.txt')
    check(gi.size === 11 && gi.type === FileType.FILE && gi.permissions === '-rw-r--r--', `getInfo: ${JSON.stringify(gi)}`)
    check(gi.owner === 'user' && gi.group === 'user' && gi.mode === 0o644, 'getInfo: owner, group, mode')
    check(Math.abs(gi.modifiedTime.getTime() - Date.now()) < 60_000, 'getInfo: modified time')

    const moved = await sb.files.rename('/tmp/hello.txt', '/tmp/d/moved.txt')
    check(moved.path === '/tmp/d/moved.txt', 'rename')
    check(
      !(await sb.files.exists('/tmp/hello.txt')) && (await sb.files.read('/tmp/d/moved.txt')) === 'hello world',
      'rename moved it',
    )
    await sb.files.remove('/tmp/d/moved.txt')
    check(!(await sb.files.exists('/tmp/d/moved.txt')), 'remove a file')
    await sb.files.remove('/tmp/d')
    check(!(await sb.files.exists('/tmp/d')), 'remove a directory tree')
    await rejects(FileNotFoundError, () => sb.files.read('/tmp/nope'), 'read a missing file')
    await rejects(FileNotFoundError, () => sb.files.getInfo('/tmp/nope'), 'getInfo of a missing file')

    const url = await sb.downloadUrl('/tmp/m/a.txt')
    check((await (await fetch(url)).text()) === 'A', 'downloadUrl (signed, no headers)')
    const form = new FormData()
    form.append('file', new Blob(['uploaded']), 'up.txt')
    const up = await fetch(await sb.uploadUrl('/tmp/up.txt'), { method: 'POST', body: form })
    check(up.status === 200 && (await sb.files.read('/tmp/up.txt')) === 'uploaded', 'uploadUrl (signed multipart)')
  } finally {
    await sb.kill()
  }
}

// (4) pause, connect (resume), metrics, snapshots
async function pause() {
  const tag = `pause-${RUN}`
  const sb = await create({ metadata: { suite: tag } })
  try {
    const h = await sb.commands.run('sleep 300', { background: true })
    await sb.files.write('/tmp/state', 'kept')
    check((await sb.pause()) === true, 'pause()')
    check((await sb.getInfo()).state === 'paused', 'getInfo: paused')
    check((await sb.isRunning()) === false, 'isRunning() of a paused sandbox')
    const listed = await Sandbox.list({ query: { metadata: { suite: tag }, state: ['paused'] } }).nextItems()
    check(listed.length === 1 && listed[0].sandboxId === sb.sandboxId, 'Sandbox.list: paused state query')
    const both = await Sandbox.list({ query: { metadata: { suite: tag }, state: ['running', 'paused'] } }).nextItems()
    check(both.length === 1 && both[0].state === 'paused', 'Sandbox.list: query on two states')
    check((await sb.pause()) === false, 'pause() of a paused sandbox is false')
    const again = await Sandbox.connect(sb.sandboxId, { timeoutMs: 400_000 })
    check((await again.isRunning()) && (await sb.getInfo()).state === 'running', 'Sandbox.connect(id) resumes')
    check((await again.commands.list()).some((p) => p.pid === h.pid), 'processes survive pause (memory kept)')
    check((await again.files.read('/tmp/state')) === 'kept', 'files survive pause')

    check((await sb.pause({ keepMemory: false })) === true, 'pause({ keepMemory: false })')
    check((await sb.getInfo()).state === 'paused', 'filesystem pause: paused')
    await sb.connect()
    check((await sb.isRunning()) && (await sb.files.read('/tmp/state')) === 'kept', 'connect() after it: files kept')
    check((await sb.commands.list()).every((p) => p.pid !== h.pid), 'filesystem pause: processes gone')

    const m = await sb.getMetrics()
    check(m.length === 1 && m[0].memUsed > 0 && m[0].cpuCount >= 1, `getMetrics: ${JSON.stringify(m)}`)
    const snap = await sb.createSnapshot()
    check(snap.snapshotId.length > 0, `createSnapshot: ${JSON.stringify(snap)}`)
    await sb.files.write('/tmp/state', 'changed')
    const clone = await Sandbox.create(snap.snapshotId, { timeoutMs: 120_000 })
    try {
      check((await clone.files.read('/tmp/state')) === 'kept', 'create from a snapshot has its files')
    } finally {
      await clone.kill()
    }
    check((await Sandbox.deleteSnapshot(snap.snapshotId)) === true, 'Sandbox.deleteSnapshot')
    check((await Sandbox.deleteSnapshot(snap.snapshotId)) === false, 'deleteSnapshot of a deleted snapshot is false')
  } finally {
    await sb.kill()
  }
}

// (5) pty and watchDir (streamed events)
async function ptyWatch() {
  const sb = await create()
  try {
    const chunks = []
    const h = await sb.pty.create({ rows: 24, cols: 80, onData: (d) => chunks.push(Buffer.from(d)) })
    const enc = new TextEncoder()
    await sb.pty.sendInput(h.pid, enc.encode('echo hi-$((40+2))\n'))
    await sb.pty.resize(h.pid, { rows: 30, cols: 100 })
    await sb.pty.sendInput(h.pid, enc.encode('stty size\n'))
    await sb.pty.sendInput(h.pid, enc.encode('exit\n'))
    const r = await h.wait()
    const text = Buffer.concat(chunks).toString()
    check(r.exitCode === 0 && text.includes('hi-42'), `pty: output ${JSON.stringify(text.slice(-120))}`)
    check(text.includes('30 100'), 'pty: resize')

    await sb.files.makeDir('/tmp/w')
    const events = []
    const watch = await sb.files.watchDir('/tmp/w', (e) => events.push(e))
    await sb.files.write('/tmp/w/new.txt', 'x')
    const deadline = Date.now() + 5000
    while (!events.some((e) => e.name === 'new.txt') && Date.now() < deadline) await sleep(100)
    check(
      events.some((e) => e.name === 'new.txt' && e.type === FilesystemEventType.CREATE),
      `watchDir: ${JSON.stringify(events)}`,
    )
    await watch.stop()
  } finally {
    await sb.kill()
  }
}

const SECTIONS = { lifecycle, commands, files, pause, ptyWatch }

const names = process.argv.slice(2).length ? process.argv.slice(2) : Object.keys(SECTIONS)
for (const n of names) {
  const t0 = Date.now()
  console.log(`== ${n}`)
  await SECTIONS[n]()
  console.log(`== ${n} passed in ${((Date.now() - t0) / 1000).toFixed(1)}s`)
}
console.log('ALL PASSED')
