import { sveltekit } from '@sveltejs/kit/vite';
import { defineConfig } from 'vite';

// `npm run dev` serves the dashboard with hot reload and forwards the API paths to a running node
// (RINGLET_API, default http://127.0.0.1:52415), so the page talks to it exactly as when the node serves it.
const api = process.env.RINGLET_API ?? 'http://127.0.0.1:52415';
const apiPaths = ['/state', '/topology', '/engines', '/models', '/instance', '/node_id', '/health', '/metrics', '/v1', '/api'];

export default defineConfig({
	plugins: [sveltekit()],
	// SvelteKit's own writeBundle step dominates the build; the timing report would only repeat that
	build: { rolldownOptions: { checks: { bundlerTimings: false } } },
	server: {
		proxy: Object.fromEntries(apiPaths.map((path) => [path, { target: api, changeOrigin: true }]))
	}
});
