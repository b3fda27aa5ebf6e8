// Which instance types the cluster can run, decided from the state the page receives (so the choice
// updates the moment a node with the right hardware joins), and why the others are impossible.

import type { EngineType, InstanceMeta, InstanceType, ModelCard, NodeInfo } from './types';

export interface InstanceChoice {
	type: InstanceType;
	label: string;
	/** the engine every stage runs; null for the mixed ring, whose stages run their own node's engine */
	engine: EngineType | null;
	/** what the ring runs on and how its stages talk, in a few words */
	summary: string;
}

/** The buttons of the instance-type choice, in the order of DESIGN.md's engine preference. */
export const INSTANCE_CHOICES: readonly InstanceChoice[] = [
	{ type: 'MlxRing', label: 'MLX Ring', engine: 'mlx', summary: 'Apple Silicon · mlx.distributed ring' },
	{ type: 'MlxJaccl', label: 'MLX Jaccl', engine: 'mlx', summary: 'Thunderbolt RDMA · macOS (was MlxIbv)' },
	{ type: 'IpexRing', label: 'Intel IPEX', engine: 'ipex', summary: 'Intel GPU · torch.xpu, xccl' },
	{ type: 'CudaRing', label: 'CUDA Ring', engine: 'cuda', summary: 'NVIDIA GPU · torch NCCL' },
	{ type: 'CpuRing', label: 'CPU Ring', engine: 'cpu', summary: 'any CPU · torch gloo' },
	{ type: 'MixedRing', label: 'Mixed Ring', engine: null, summary: "each node's own engine · gloo" }
];

export const ENGINE_LABEL: Record<EngineType, string> = {
	mlx: 'MLX',
	ipex: 'Intel IPEX',
	cuda: 'CUDA',
	cpu: 'CPU'
};

/** What the cluster lacks when no node runs an engine, phrased as a user would say it. */
const MISSING_HARDWARE: Record<EngineType, string> = {
	mlx: 'no node runs MLX (Apple Silicon)',
	ipex: 'no node has an Intel GPU',
	cuda: 'no node has an NVIDIA GPU',
	cpu: 'no node has the CPU engine (torch)'
};

/** The type the API knows a choice by: the old name MlxIbv is MlxJaccl. */
export function canonicalInstanceType(meta: InstanceMeta): InstanceType {
	return meta === 'MlxIbv' ? 'MlxJaccl' : meta;
}

export function instanceEngine(meta: InstanceMeta): EngineType | null {
	const type = canonicalInstanceType(meta);
	const choice = INSTANCE_CHOICES.find((c) => c.type === type);
	if (!choice) throw new Error(`unknown instance type ${meta}`);
	return choice.engine;
}

export interface RuntimeMatch {
	possible: boolean;
	/** one line saying why not; null when possible */
	reason: string | null;
	/** each node's own reason, when the engine is missing everywhere */
	nodeReasons: string[];
	/** the nodes whose engines suit the type */
	nodes: NodeInfo[];
}

/**
 * Whether `meta` can run `card` on `nodes`: the model's format must suit the type, and at least one node
 * must have the type's engine. Memory is left to the placement preview, which the node computes.
 */
export function matchesSelectedRuntime(meta: InstanceMeta, nodes: readonly NodeInfo[], card: ModelCard | null): RuntimeMatch {
	const type = canonicalInstanceType(meta);
	const engine = instanceEngine(type);
	if (nodes.length === 0) {
		return { possible: false, reason: 'the cluster has no nodes', nodeReasons: [], nodes: [] };
	}
	if (engine === null) {
		// a mixed ring runs any model on every node that has an engine of its own
		const suitable = nodes.filter((n) => n.engines.selected_engine !== null);
		if (suitable.length > 0) return { possible: true, reason: null, nodeReasons: [], nodes: suitable };
		return { possible: false, reason: 'no node has an engine', nodeReasons: [], nodes: [] };
	}
	const suitable = nodes.filter((n) => n.engines.available_engines.includes(engine));
	if (suitable.length === 0) {
		const nodeReasons = nodes.map((n) => `${n.name}: ${n.engines.reasons[engine]?.reason ?? `no ${ENGINE_LABEL[engine]} engine`}`);
		return { possible: false, reason: MISSING_HARDWARE[engine], nodeReasons, nodes: [] };
	}
	if (type === 'MlxJaccl' && !suitable.some((n) => n.hardware.system === 'Darwin')) {
		// jaccl is RDMA over Thunderbolt, which only macOS provides; MLX on a Linux CPU can only ring
		return { possible: false, reason: 'MLX Jaccl needs Macs (RDMA over Thunderbolt); no node runs macOS', nodeReasons: [], nodes: [] };
	}
	if (card && !card.instance_types.includes(type)) {
		const format = card.format === 'gguf' ? 'a GGUF file' : 'safetensors';
		// every model runs on a mixed ring too (its stages load GGUF and safetensors alike)
		const runsAs = [...new Set([...card.instance_types, 'MixedRing'])].join(', ');
		return {
			possible: false,
			reason: `${card.id} is ${format}; it runs as ${runsAs}`,
			nodeReasons: [],
			nodes: suitable
		};
	}
	return { possible: true, reason: null, nodeReasons: [], nodes: suitable };
}

/** The choice to preselect: `current` while it stays possible, else one that runs on an engine some
 * node selected by itself (so a CPU box does not default to MLX-on-CPU), else any possible one. */
export function bestChoice(current: InstanceMeta, nodes: readonly NodeInfo[], card: ModelCard | null): InstanceType {
	if (matchesSelectedRuntime(current, nodes, card).possible) return canonicalInstanceType(current);
	const selected = new Set(nodes.map((n) => n.engines.selected_engine));
	const possible = INSTANCE_CHOICES.filter((c) => matchesSelectedRuntime(c.type, nodes, card).possible);
	const preferred = possible.find((c) => c.engine !== null && selected.has(c.engine)) ?? possible[0];
	return preferred?.type ?? canonicalInstanceType(current);
}
