/*
 * bcryptprimitives.dll for Wine versions that lack it (Debian's Wine 8).
 *
 * Rust's standard library (1.78 and later) gets its random numbers from
 * ProcessPrng in bcryptprimitives.dll; without that export every Windows test
 * executable dies at start-up under Wine (exit code 53). This DLL provides
 * ProcessPrng on top of BCryptGenRandom, which Wine does implement.
 *
 * Built and installed into the Wine prefix by ci/cross-test.sh:
 *   x86_64-w64-mingw32-gcc -shared -O2 -o bcryptprimitives.dll \
 *       ci/bcryptprimitives.c -lbcrypt
 */
#include <windows.h>
#include <bcrypt.h>

__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T length)
{
    while (length > 0) {
        ULONG chunk = length > 0x40000000 ? 0x40000000 : (ULONG)length;
        if (!BCRYPT_SUCCESS(BCryptGenRandom(NULL, data, chunk, BCRYPT_USE_SYSTEM_PREFERRED_RNG))) {
            return FALSE;
        }
        data += chunk;
        length -= chunk;
    }
    return TRUE;
}
