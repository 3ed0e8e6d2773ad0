"""Algorithm names: one table between netsh spellings, the model's enums and display.

netsh (and the Windows UI) number the 2048-bit MODP group "3" ("High (2048)"),
but IANA IKE group 3 is EC2N-155: on the wire it is group 14 (windows-ipsec.md
§1.5; [MS-GPIPSEC] §2.2.1.2.1 Oakley-Group 0x10000001). The mapping lives
here and nowhere else. AES, SHA-2 and the larger groups are extensions beyond
Windows Server 2003, which knew DES/3DES, MD5/SHA1 and groups 1, 2 and 2048.
"""

from __future__ import annotations

from policyagent.pb import pb

# netsh name (upper case) -> enum value. The first name of each value is how we print it.
CIPHERS: dict[str, int] = {
    "DES": pb.CIPHER_DES,
    "3DES": pb.CIPHER_3DES,
    "AES128": pb.CIPHER_AES128,
    "AES192": pb.CIPHER_AES192,
    "AES256": pb.CIPHER_AES256,
    "NONE": pb.CIPHER_NONE,
}

INTEGRITIES: dict[str, int] = {
    "MD5": pb.INTEGRITY_MD5,
    "SHA1": pb.INTEGRITY_SHA1,
    "SHA256": pb.INTEGRITY_SHA256,
    "SHA384": pb.INTEGRITY_SHA384,
    "SHA512": pb.INTEGRITY_SHA512,
    "NONE": pb.INTEGRITY_NONE,
}

# Accepted spellings of DH groups in mmsecmethods. "1", "2", "3" are netsh's
# numbering; 14 and up are IANA numbers (unambiguous there, since netsh stops at 3).
DH_GROUPS: dict[str, int] = {
    "1": pb.DH_GROUP_MODP768,
    "2": pb.DH_GROUP_MODP1024,
    "3": pb.DH_GROUP_MODP2048,
    "14": pb.DH_GROUP_MODP2048,
    "15": pb.DH_GROUP_MODP3072,
    "16": pb.DH_GROUP_MODP4096,
    "19": pb.DH_GROUP_ECP256,
    "20": pb.DH_GROUP_ECP384,
    "LOW": pb.DH_GROUP_MODP768,
    "MEDIUM": pb.DH_GROUP_MODP1024,
    "HIGH": pb.DH_GROUP_MODP2048,
    "DH2048": pb.DH_GROUP_MODP2048,
    "MODP768": pb.DH_GROUP_MODP768,
    "MODP1024": pb.DH_GROUP_MODP1024,
    "MODP2048": pb.DH_GROUP_MODP2048,
    "MODP3072": pb.DH_GROUP_MODP3072,
    "MODP4096": pb.DH_GROUP_MODP4096,
    "ECP256": pb.DH_GROUP_ECP256,
    "ECP384": pb.DH_GROUP_ECP384,
}

# How each group is printed back in netsh syntax (must parse back to the same value).
DH_NETSH: dict[int, str] = {
    pb.DH_GROUP_MODP768: "1",
    pb.DH_GROUP_MODP1024: "2",
    pb.DH_GROUP_MODP2048: "3",
    pb.DH_GROUP_MODP3072: "15",
    pb.DH_GROUP_MODP4096: "16",
    pb.DH_GROUP_ECP256: "19",
    pb.DH_GROUP_ECP384: "20",
}

DH_DISPLAY: dict[int, str] = {
    pb.DH_GROUP_MODP768: "Low (1)",
    pb.DH_GROUP_MODP1024: "Medium (2)",
    pb.DH_GROUP_MODP2048: "High (2048)",
    pb.DH_GROUP_MODP3072: "MODP-3072 (15)",
    pb.DH_GROUP_MODP4096: "MODP-4096 (16)",
    pb.DH_GROUP_ECP256: "ECP-256 (19)",
    pb.DH_GROUP_ECP384: "ECP-384 (20)",
}

# Main mode needs real encryption and integrity; quick mode may use NONE in ESP.
MM_CIPHERS = frozenset(v for k, v in CIPHERS.items() if k != "NONE")
MM_INTEGRITIES = frozenset(v for k, v in INTEGRITIES.items() if k != "NONE")
AH_INTEGRITIES = MM_INTEGRITIES
KNOWN_CIPHERS = frozenset(CIPHERS.values())
KNOWN_INTEGRITIES = frozenset(INTEGRITIES.values())
KNOWN_DH_GROUPS = frozenset(DH_NETSH)

# IKE wire numbers are the enum values themselves (see policy.proto).


def cipher_name(value: int) -> str:
    for name, v in CIPHERS.items():
        if v == value:
            return name
    return f"unknown({value})"


def integrity_name(value: int) -> str:
    for name, v in INTEGRITIES.items():
        if v == value:
            return name
    return f"unknown({value})"


def dh_netsh(value: int) -> str:
    return DH_NETSH.get(value, f"unknown({value})")


def dh_display(value: int) -> str:
    return DH_DISPLAY.get(value, f"unknown({value})")


def ike_group_number(value: int) -> int:
    """The IANA IKE group number sent on the wire for a DhGroup value."""
    return int(value)
