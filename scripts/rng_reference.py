"""The sampler's random numbers from the published algorithms, independently of the
Rust code: SplitMix64 (Steele, Lea, Flood) seeds xoshiro256** (Blackman, Vigna), with
blip2-ort's stream mixing (crates/blip2-runtime/src/generation/rng.rs). Prints the first
draws that the unit test `first_draws_are_pinned` holds the Rust generator to, so "the
same seed gives the same samples on every version" is checked.

    python3 scripts/rng_reference.py
"""

M = (1 << 64) - 1


def splitmix64(state):
    state = (state + 0x9E3779B97F4A7C15) & M
    z = state
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return state, z ^ (z >> 31)


def rotl(x, k):
    return ((x << k) | (x >> (64 - k))) & M


def new(seed, stream):
    _, base = splitmix64(seed)
    sm = base ^ rotl((stream * 0xD605BBB58C8ABBB5) & M, 17)
    s = []
    for _ in range(4):
        sm, x = splitmix64(sm)
        s.append(x)
    return s


def next_u64(s):
    result = (rotl((s[1] * 5) & M, 7) * 9) & M
    t = (s[1] << 17) & M
    s[2] ^= s[0]
    s[3] ^= s[1]
    s[1] ^= s[2]
    s[0] ^= s[3]
    s[2] ^= t
    s[3] = rotl(s[3], 45)
    return result


for seed, stream in [(0, 0), (42, 1), (7, 3)]:
    s = new(seed, stream)
    print(f"({seed}, {stream}, [{', '.join(f'0x{next_u64(s):016x}' for _ in range(3))}]),")
