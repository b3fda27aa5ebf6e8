// Numbers as people read them.

const BYTE_UNITS = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];

export function formatBytes(bytes: number | null | undefined, digits = 1): string {
	if (bytes === null || bytes === undefined || !Number.isFinite(bytes)) return '—';
	let value = bytes;
	let unit = 0;
	while (Math.abs(value) >= 1024 && unit < BYTE_UNITS.length - 1) {
		value /= 1024;
		unit += 1;
	}
	return `${value.toFixed(unit === 0 ? 0 : digits)} ${BYTE_UNITS[unit]}`;
}

/** 134515008 → "135M", 8030261248 → "8.0B" */
export function formatParameters(count: number): string {
	if (count >= 1e9) return `${(count / 1e9).toFixed(1)}B`;
	if (count >= 1e6) return `${Math.round(count / 1e6)}M`;
	return `${Math.round(count / 1e3)}K`;
}

export function formatPercent(fraction: number): string {
	return `${Math.round(Math.min(Math.max(fraction, 0), 1) * 100)}%`;
}

export function formatSeconds(seconds: number | null | undefined): string {
	if (seconds === null || seconds === undefined || !Number.isFinite(seconds)) return '—';
	return seconds < 1 ? `${Math.round(seconds * 1000)} ms` : `${seconds.toFixed(2)} s`;
}

export function formatRate(perSecond: number | null | undefined): string {
	if (perSecond === null || perSecond === undefined || !Number.isFinite(perSecond)) return '—';
	return perSecond >= 100 ? perSecond.toFixed(0) : perSecond.toFixed(1);
}

export function formatAge(epochSeconds: number, now = Date.now() / 1000): string {
	const age = Math.max(0, now - epochSeconds);
	if (age < 60) return `${Math.round(age)} s ago`;
	if (age < 3600) return `${Math.round(age / 60)} min ago`;
	return `${(age / 3600).toFixed(1)} h ago`;
}

/** A stage split over Intel GPUs: "GPU 0: layers 0–14 · GPU 1: layers 15–29". */
export function splitOver(devices: { device: number; start: number; end: number }[]): string {
	return devices.map((d) => `GPU ${d.device}: layers ${d.start}–${d.end - 1}`).join(' · ');
}

/** 12/30 layers · 450.0 MiB of 1.1 GiB */
export function describeLoad(load: {
	layers_loaded: number;
	layers_total: number;
	bytes_loaded: number;
	bytes_total: number | null;
}): string {
	const kept = load.bytes_total ? `${formatBytes(load.bytes_loaded)} of ${formatBytes(load.bytes_total)}` : formatBytes(load.bytes_loaded);
	return `${load.layers_loaded}/${load.layers_total} layers · ${kept}`;
}
