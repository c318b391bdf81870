// The MCP page: the tools this appliance serves at /mcp that the signed-in caller may call
// (GET /api/v1/mcp/tools, schemas on demand), and the JSON config an MCP client (a desktop
// assistant, an IDE, a coding agent) takes to reach them. app.js hands in its helpers.

// A client's config for this server's gateway; with auth on it needs an API key (never this tab's
// own: the page holds no secret it did not make).
export function clientConfig(origin, auth) {
  const server = { url: `${origin}/mcp` };
  if (auth) server.headers = { Authorization: "Bearer YOUR_API_KEY" };
  return JSON.stringify({ mcpServers: { appliance: server } }, null, 2);
}

export async function mcpPage({ h, api, page, me, current, report }) {
  const config = h("pre", { id: "mcp-config" }, clientConfig(location.origin, me.auth));
  const copied = h("span", { class: "muted", id: "mcp-config-copied" });
  const copy = async () => {
    try { await navigator.clipboard.writeText(config.textContent); copied.textContent = " copied"; }
    catch { getSelection().selectAllChildren(config); copied.textContent = " selected: copy it with Ctrl+C"; }
  };
  const tools = h("div", { id: "mcp-tools" }, "Loading…");
  page.replaceChildren(h("h1", {}, "MCP"),
    h("p", { class: "muted" }, "Agents call this appliance's models, tasks and settings as Model Context Protocol tools at ",
      h("code", {}, `${location.origin}/mcp`), " (Streamable HTTP). Every call is checked against your role and audited (action mcp.call); no argument or answer is stored."),
    h("h2", {}, "Client config"),
    h("p", {}, "Paste this into your MCP client's configuration (its mcpServers section). ",
      me.auth ? h("span", {}, "Replace YOUR_API_KEY with a key from the ", h("a", { href: "#/keys" }, "Keys page"), ".")
        : "Auth is off: any program on this machine may call the tools without a key.",
      " It reaches only this server, so it works air-gapped too."),
    config,
    h("p", {}, h("button", { type: "button", class: "secondary", id: "mcp-config-copy", onclick: copy }, "Copy the config"), copied),
    h("h2", {}, "Tools you may call"),
    tools,
    h("p", { class: "muted", id: "mcp-jobs" }, "A task's job calls only the tools its task was granted (the tool boxes on the ",
      h("a", { href: "#/tasks" }, "Tasks page"), ") at $MCP_URL. The artifacts tools read and write a job's own /work: only jobs may call them."));
  let listed;
  try { listed = await api("GET", "/api/v1/mcp/tools"); } catch (error) { tools.replaceChildren(); report(error); return; }
  if (!current()) return;
  tools.replaceChildren(listed.length === 0 ? h("p", { class: "muted" }, "No tool: your role may call none.")
    : h("table", { id: "mcp-tools-table" },
      h("thead", {}, h("tr", {}, ["Tool", "What it does", "Needs"].map((t) => h("th", {}, t)))),
      h("tbody", {}, listed.map((tool) => h("tr", { "data-tool": tool.name },
        h("td", {}, h("code", {}, tool.name), h("div", { class: "muted" }, tool.title)),
        h("td", {}, tool.description,
          h("details", {}, h("summary", {}, "Schemas"),
            h("p", {}, "Input"), h("pre", { class: "mcp-schema mcp-input-schema" }, JSON.stringify(tool.input_schema, null, 2)),
            h("p", {}, "Output"), h("pre", { class: "mcp-schema mcp-output-schema" }, JSON.stringify(tool.output_schema, null, 2)))),
        h("td", { class: "mono" }, tool.action, tool.task_only ? h("div", { class: "muted" }, "task jobs only") : null))))));
}
