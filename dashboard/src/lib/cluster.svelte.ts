// The live cluster as the page sees it: /state polled every second (joins and leaves show within 2 s),
// the model catalog refreshed when the state changes, and a short log of what changed.

import { describeError, getModels, getNodeId, getState, listDownloads } from './api';
import type { CatalogModel, ClusterState, DownloadRecord, DownloadStatus, InstanceRecord, NodeInfo } from './types';

const STATE_POLL_MS = 1000;
const MODELS_REFRESH_MS = 10000;
const ACTIVITY_KEPT = 12;

export interface Activity {
	at: Date;
	text: string;
	tone: 'good' | 'bad' | 'info';
}

export class Cluster {
	state = $state<ClusterState | null>(null);
	models = $state<CatalogModel[]>([]);
	/** the node that serves this page */
	self = $state<{ node_id: string; name: string } | null>(null);
	error = $state<string | null>(null);
	modelsError = $state<string | null>(null);
	updatedAt = $state<Date | null>(null);
	activity = $state<Activity[]>([]);

	/** this node first, then by name */
	nodes: NodeInfo[] = $derived(
		this.state
			? Object.values(this.state.nodes).sort(
					(a, b) => Number(b.node_id === this.self?.node_id) - Number(a.node_id === this.self?.node_id) || a.name.localeCompare(b.name)
				)
			: []
	);
	instances: InstanceRecord[] = $derived(
		this.state ? Object.values(this.state.instances).sort((a, b) => a.created_at - b.created_at) : []
	);
	readyInstances: InstanceRecord[] = $derived(this.instances.filter((r) => r.status === 'ready'));
	/** this node's downloads as its download manager has them now (/state carries progress at most twice a
	 * second); fetched while one of them runs */
	ownDownloads = $state<Record<string, DownloadStatus>>({});
	/** running first, then the newest; this node's with their latest progress */
	downloads: DownloadRecord[] = $derived(
		this.state
			? Object.values(this.state.downloads)
					.map((d) => {
						const own = d.node_id === this.self?.node_id ? this.ownDownloads[d.download_id] : undefined;
						return own && own.state === d.state ? { ...d, done: own.done, total: own.total } : d;
					})
					.reverse()
					.sort((a, b) => Number(b.state === 'running') - Number(a.state === 'running'))
			: []
	);

	#timer: ReturnType<typeof setTimeout> | null = null;
	#modelsFetchedAt = 0;
	#modelsKey = '';
	#modelsInFlight: Promise<void> | null = null;
	#stopped = false;

	start(): void {
		this.#stopped = false;
		void this.#poll();
	}

	stop(): void {
		this.#stopped = true;
		if (this.#timer !== null) clearTimeout(this.#timer);
	}

	/** Fetch now (after the page changed something) instead of waiting for the next tick. */
	async refresh(): Promise<void> {
		await Promise.all([this.#fetchState(), this.refreshModels()]);
	}

	/** Refetch the catalog; calls while one is on its way share it (a cold node takes seconds). */
	refreshModels(): Promise<void> {
		this.#modelsInFlight ??= this.#fetchModels().finally(() => (this.#modelsInFlight = null));
		return this.#modelsInFlight;
	}

	async #fetchModels(): Promise<void> {
		this.#modelsFetchedAt = Date.now();
		try {
			this.models = (await getModels()).models;
			this.modelsError = null;
		} catch (error) {
			this.modelsError = describeError(error);
		}
	}

	nodeName(nodeId: string): string {
		return this.state?.nodes[nodeId]?.name ?? nodeId;
	}

	async #loadSelf(): Promise<void> {
		try {
			this.self = await getNodeId();
		} catch (error) {
			this.error = describeError(error);
		}
	}

	async #poll(): Promise<void> {
		if (!this.self) void this.#loadSelf(); // until the node has answered once
		await this.#fetchState();
		await this.#fetchOwnDownloads();
		// the fits in the catalog follow the nodes and instances; refetch when those change
		const key = this.#catalogKey();
		if (key !== this.#modelsKey || Date.now() - this.#modelsFetchedAt > MODELS_REFRESH_MS) {
			this.#modelsKey = key;
			void this.refreshModels(); // never holds up the state poll
		}
		if (!this.#stopped) this.#timer = setTimeout(() => void this.#poll(), STATE_POLL_MS);
	}

	async #fetchState(): Promise<void> {
		try {
			const next = await getState();
			if (this.state) this.#noteChanges(this.state, next);
			this.state = next;
			this.error = null;
			this.updatedAt = new Date();
		} catch (error) {
			this.error = describeError(error);
		}
	}

	async #fetchOwnDownloads(): Promise<void> {
		const selfId = this.self?.node_id;
		const running = Object.values(this.state?.downloads ?? {}).some((d) => d.node_id === selfId && d.state === 'running');
		if (!running) {
			if (Object.keys(this.ownDownloads).length > 0) this.ownDownloads = {};
			return;
		}
		try {
			this.ownDownloads = Object.fromEntries((await listDownloads()).map((d) => [d.download_id, d]));
		} catch {
			this.ownDownloads = {}; // /state's figures stand; its own poll reports a node that cannot be reached
		}
	}

	#catalogKey(): string {
		if (!this.state) return '';
		// a node's store changing (a download done, a model deleted) changes where each model is on disk
		const nodes = Object.values(this.state.nodes).map(
			(n) =>
				`${n.node_id}:${n.engines.available_engines.join('+')}:${(n.models ?? []).map((m) => `${m.model}@${m.status}`).join('+')}`
		);
		const instances = Object.values(this.state.instances).map((r) => `${r.instance.instance_id}:${r.status}`);
		// a finished download changes what is on disk
		const downloads = Object.values(this.state.downloads).map((d) => `${d.download_id}:${d.state}`);
		return [...nodes.sort(), ...instances.sort(), ...downloads.sort()].join(',');
	}

	#noteChanges(before: ClusterState, after: ClusterState): void {
		const notes: Activity[] = [];
		const at = new Date();
		for (const [id, node] of Object.entries(after.nodes)) {
			if (!(id in before.nodes)) notes.push({ at, text: `${node.name} joined`, tone: 'good' });
		}
		for (const [id, node] of Object.entries(before.nodes)) {
			if (!(id in after.nodes)) notes.push({ at, text: `${node.name} left`, tone: 'bad' });
		}
		for (const [id, record] of Object.entries(after.instances)) {
			const old = before.instances[id];
			const name = `${record.instance.model} (${record.instance.instance_type})`;
			if (!old) notes.push({ at, text: `${name} created`, tone: 'info' });
			else if (old.status !== record.status) {
				const tone = record.status === 'failed' ? 'bad' : record.status === 'ready' ? 'good' : 'info';
				notes.push({ at, text: `${name} ${record.status}`, tone });
			}
		}
		for (const [id, record] of Object.entries(before.instances)) {
			if (!(id in after.instances)) notes.push({ at, text: `${record.instance.model} deleted`, tone: 'info' });
		}
		if (notes.length) this.activity = [...notes.reverse(), ...this.activity].slice(0, ACTIVITY_KEPT);
	}
}
